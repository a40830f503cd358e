"""The reward model (InstructGPT step 2): ranking.py (K-wise ranking loss, normalisation, steps, metrics),
trainer.py (the phase), inference/scorer.py (the scoring API and the `score` command)."""
