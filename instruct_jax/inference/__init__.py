"""Inference: the one sampler (inference/sampling.py), log-probs of responses (logprobs.py), the policy runner (runner.py)."""
