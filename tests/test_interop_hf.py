"""Hugging Face interop: logits and greedy parity with transformers for each supported family,
sharded loading, import -> export -> transformers round trips, tokenizer export, and the CLI.

The reference is transformers (PyTorch, CPU, float32) running the same checkpoint. Each family
is a tiny random config (FAMILIES) with its distinguishing features switched on; weights are
drawn large enough that logits spread out, so a layout bug cannot hide under 1e-4.
"""

from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from instruct_jax.inference.sampling import SamplingConfig, make_sampler  # noqa: E402
from instruct_jax.interop import UnsupportedConfig, export_hf, import_hf, model_config_from_hf  # noqa: E402
from instruct_jax.interop.hf import target_params  # noqa: E402
from instruct_jax.interop.safetensors_io import SafetensorsCheckpoint  # noqa: E402
from instruct_jax.model.config import ModelConfig  # noqa: E402
from instruct_jax.model.transformer import ModelInput, Transformer  # noqa: E402
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.parallel.mesh import make_mesh  # noqa: E402

SEQ = 48  # test sequence length: past every original_max_position_embeddings below
LOGIT_TOL = 1e-4

_BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}  # bands at wavelengths 4..16 tokens: inside SEQ

FAMILIES = {
    "llama2": dict(_BASE, model_type="llama", num_key_value_heads=4),  # multi-head, no scaling
    "llama3": dict(_BASE, model_type="llama", rope_theta=500000.0),  # GQA, theta 5e5
    "llama3.1": dict(_BASE, model_type="llama", rope_theta=500000.0, rope_scaling=dict(_LLAMA3, factor=8.0)),
    "llama3.2": dict(_BASE, model_type="llama", rope_theta=500000.0, tie_word_embeddings=True,
                     rope_scaling=dict(_LLAMA3, factor=32.0)),
    "llama-linear": dict(_BASE, model_type="llama", rope_scaling={"type": "linear", "factor": 4.0}),
    "llama-yarn": dict(_BASE, model_type="llama", max_position_embeddings=64,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(_BASE, model_type="mistral", head_dim=24, sliding_window=None),  # head_dim != d / heads
    "qwen2": dict(_BASE, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True,
                  use_sliding_window=False),  # q/k/v biases
    "smollm2": dict(_BASE, model_type="llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                    tie_word_embeddings=True, rope_theta=100000.0),  # 3:1 GQA, tied
}


def build_hf_model(hf_config: dict, seed: int = 0, cls_name: str = "AutoModelForCausalLM"):
    """A transformers model of this config with random weights that make logits spread out.

    The default init (std 0.02, norms 1, biases 0) gives near-uniform logits that a layout bug
    could still match to 1e-4; std 0.15 weights and norms / biases away from 1 / 0 do not.
    """
    config = transformers.AutoConfig.for_model(**hf_config)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name).from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else
                    0.3 * noise if name.endswith("bias") else 0.15 * noise)
    return model.eval()


def random_tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def jax_logits(params, cfg: ModelConfig, tokens: np.ndarray, mesh=None, rules=()) -> np.ndarray:
    fn = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, ModelInput.unpacked(x)).logits)
    if mesh is None:
        return np.asarray(fn(params, jnp.asarray(tokens)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return np.asarray(fn(params, jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def mesh_and_rules():
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)  # d_model over 4, heads / mlp / vocab over 2
    return make_mesh(mesh_cfg, jax.devices()), mesh_cfg.logical_rules()


# ----------------------------------------------------------------------------- parity per family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_greedy_and_round_trip_match_transformers(family, tmp_path, mesh_and_rules):
    mesh, rules = mesh_and_rules
    hf_cfg = FAMILIES[family]
    model = build_hf_model(hf_cfg)
    model.save_pretrained(tmp_path / "hf")
    params, cfg = import_hf(str(tmp_path / "hf"), mesh=mesh, rules=rules)

    # 1. Logits on a random sequence longer than every RoPE band edge.
    tokens = random_tokens(hf_cfg["vocab_size"], (2, SEQ))
    reference = hf_logits(model, tokens)
    ours = jax_logits(params, cfg, tokens, mesh, rules)
    diff = float(np.abs(ours - reference).max())
    print(f"{family}: max |logit diff| = {diff:.2e} (logits up to {np.abs(reference).max():.1f})")
    assert diff < LOGIT_TOL

    # 2. Greedy decoding of a left-padded batch, token for token, through the shared sampler.
    t, n = 12, 16
    lengths = np.array([12, 9, 7, 12])
    valid = np.arange(t)[None, :] >= (t - lengths)[:, None]
    prompts = np.where(valid, random_tokens(hf_cfg["vocab_size"], (4, t), seed=1), 0)
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompts, dtype=torch.long),
                                  attention_mask=torch.tensor(valid.astype(np.int64)), max_new_tokens=n,
                                  do_sample=False, eos_token_id=2, pad_token_id=0)[:, t:].numpy()
    sampler = make_sampler(Transformer(cfg), SamplingConfig(max_new_tokens=n, temperature=0.0, stop_tokens=(2,),
                                                            pad_id=0),
                           mesh, rules, target_params(cfg, mesh, rules)[1])
    out = sampler.sample(params, ModelInput.left_padded(jnp.asarray(prompts), jnp.asarray(lengths)),
                         jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :expected.shape[1]], expected)

    # 3. import -> export -> transformers: the same logits (float32 weights round trip exactly).
    family_name = hf_cfg["model_type"]
    export_hf(str(tmp_path / "out"), params, cfg, family=family_name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(reloaded).__name__ == type(model).__name__
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), reference)


# ----------------------------------------------------------------------------- loading details
class CountingSource(SafetensorsCheckpoint):
    """Records how many elements each read returns."""

    reads: list

    def read(self, name, index=()):
        out = super().read(name, index)
        self.reads.append((name, out.size))
        return out


def test_each_device_reads_only_its_own_shard(tmp_path, mesh_and_rules):
    from instruct_jax.interop.hf import load_from_source

    mesh, rules = mesh_and_rules
    build_hf_model(FAMILIES["llama3"]).save_pretrained(tmp_path)
    cfg = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    source = CountingSource(str(tmp_path))
    source.reads = []
    params = load_from_source(source, cfg, cfg.vocab_size, mesh, rules)
    shards = {name: leaf.sharding.shard_shape(leaf.shape) for name, leaf in
              [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]}
    biggest_shard = {k: math.prod(v[1:]) if len(v) > 2 else math.prod(v) for k, v in shards.items()}
    q = params["layers"]["attn"]["q"]
    assert q.sharding.shard_shape(q.shape) == (2, 16, 2, 16)  # D over fsdp=4, heads over tensor=2
    # No single read is larger than one layer of the largest per-device shard.
    assert max(size for _, size in source.reads) <= max(biggest_shard.values())
    per_layer_q = [size for name, size in source.reads if name.endswith("q_proj.weight")]
    assert set(per_layer_q) == {16 * 2 * 16}  # [rows of 2 heads x 16, 16 columns], never the whole [64, 64]


def test_bfloat16_sharded_checkpoint_imports_and_exports(tmp_path):
    model = build_hf_model(FAMILIES["qwen2"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several files + index.json
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    params, cfg = import_hf(str(tmp_path / "hf"))
    tokens = random_tokens(96, (1, 16))
    # The same bfloat16 weights computed in float32 (reloaded: .float() would keep a bfloat16 RoPE table).
    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                                            dtype=torch.float32), tokens)
    assert np.abs(jax_logits(params, cfg, tokens) - reference).max() < LOGIT_TOL
    export_hf(str(tmp_path / "out"), params, cfg, dtype="bfloat16", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), reference)


def test_vocab_rows_beyond_the_checkpoint_are_mean_rows_and_export_can_drop_them(tmp_path):
    model = build_hf_model(FAMILIES["llama2"])
    model.save_pretrained(tmp_path / "hf")
    params, cfg = import_hf(str(tmp_path / "hf"), vocab_size=100)
    embedding = np.asarray(params["embedding"])
    np.testing.assert_allclose(embedding[96:], np.broadcast_to(embedding[:96].mean(0), (4, 64)), atol=1e-6)
    tokens = random_tokens(96, (1, 16))
    np.testing.assert_allclose(jax_logits(params, cfg, tokens)[..., :96], hf_logits(model, tokens), atol=LOGIT_TOL)
    export_hf(str(tmp_path / "out"), params, cfg, vocab_size=96)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 2.0}}, "rope_scaling.attention_factor"),
])
def test_unsupported_configs_are_errors_naming_the_key(change, key):
    with pytest.raises(UnsupportedConfig, match=key.replace(".", r"\.")):
        model_config_from_hf({**FAMILIES["llama3"], **change})


def test_rope_parameters_spelling_of_transformers_5_is_read():
    legacy = model_config_from_hf(FAMILIES["llama3.1"])
    new = {k: v for k, v in FAMILIES["llama3.1"].items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**FAMILIES["llama3.1"]["rope_scaling"], "rope_theta": 500000.0}
    assert model_config_from_hf(new) == legacy
    assert (legacy.rope_type, legacy.rope_factor, legacy.rope_original_max_len) == ("llama3", 8.0, 16)


# ----------------------------------------------------------------------------- reward model export
def test_reward_model_exports_as_a_sequence_classifier(tmp_path):
    from instruct_jax.model.heads import RewardModel

    build_hf_model(FAMILIES["smollm2"]).save_pretrained(tmp_path / "trunk")  # tied: the trunk is the whole LM
    trunk, cfg = import_hf(str(tmp_path / "trunk"))
    rng = np.random.default_rng(0)
    params = {"trunk": trunk, "head": {"kernel": jnp.asarray(rng.normal(size=cfg.d_model), jnp.float32),
                                       "bias": jnp.asarray(0.3, jnp.float32)}}
    rm = RewardModel(cfg)
    norm = {"gain": 1.7, "bias": -0.4}
    hf = export_hf(str(tmp_path / "out"), params, cfg, reward_norm=norm, pad_token_id=0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    lengths = np.array([10, 7, 4])
    tokens = np.where(np.arange(10)[None, :] < lengths[:, None], random_tokens(96, (3, 10)), 0)  # right-padded
    with torch.no_grad():  # transformers scores each row at its last non-pad token
        hf_scores = model(torch.tensor(tokens, dtype=torch.long)).logits[:, 0].numpy()
    score = jax.jit(lambda p, x, n: rm.apply({"params": p}, ModelInput.unpacked(x, n), n - 1))
    raw = score(params, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32))
    ours = np.asarray(raw) * norm["gain"] + norm["bias"]
    np.testing.assert_allclose(hf_scores + hf["instruct_jax_reward_offset"], ours, atol=1e-4)


# ----------------------------------------------------------------------------- tokenizer and CLI
def write_tiny_tokenizer(folder) -> None:
    """A word-level tokenizer.json with ChatML specials and a Jinja chat template, like SmolLM2's."""
    import tokenizers

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "\n", "user", "assistant", "system"] + [
        f"w{i}" for i in range(88)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\n| "), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens([tokenizers.AddedToken(w, special=True) for w in words[:3]])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                   "unk_token": "[UNK]", "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def test_cli_import_then_export_round_trips_model_and_tokenizer(tmp_path):
    from instruct_jax.__main__ import main
    from instruct_jax.checkpoint import load_params
    from instruct_jax.data.chat import load_chat_template
    from instruct_jax.data.tokenizer import load_tokenizer

    hf_cfg = dict(FAMILIES["smollm2"], eos_token_id=2, bos_token_id=1, pad_token_id=2)
    model = build_hf_model(hf_cfg)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    write_tiny_tokenizer(src)

    assert main(["interop", "import", str(src), "--out", str(tmp_path / "imported")]) == 0
    meta = json.loads((tmp_path / "imported" / "model.json").read_text())
    cfg = ModelConfig(**meta["model"])
    tok = load_tokenizer(str(tmp_path / "imported" / "tokenizer"))
    assert tok.pad_is_reserved and tok.vocab_size == 97 == cfg.vocab_size  # pad == eos -> reserved row 96
    mesh, rules = make_mesh(MeshConfig(), jax.devices()), MeshConfig().logical_rules()
    params = load_params(str(tmp_path / "imported" / "params"), target_params(cfg, mesh, rules)[0])
    tokens = random_tokens(96, (2, 16))
    reference = hf_logits(model, tokens)
    assert np.abs(jax_logits(params, cfg, tokens, mesh, rules)[..., :96] - reference).max() < LOGIT_TOL

    # The model's own chat template, tokenized by us and by transformers, gives the same ids.
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    ours = load_chat_template("model", tok).render_prompt(messages)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "imported" / "tokenizer"))
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ours == list(theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs)

    # Export through an experiment file naming the imported model and tokenizer.
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from instruct_jax.config import Config\n"
        "from instruct_jax.model.config import ModelConfig\n"
        "from instruct_jax.parallel.mesh import MeshConfig\n"
        "from instruct_jax.data.config import DataConfig\n"
        f"def get_config(arg=None):\n"
        f"    return Config(model=ModelConfig(**{meta['model']!r}), mesh=MeshConfig(),\n"
        f"                  data=DataConfig(tokenizer={str(tmp_path / 'imported' / 'tokenizer')!r},"
        f" chat_template='model'))\n")
    assert main(["interop", "export", "--experiment", str(experiment), "--workdir", str(tmp_path / "imported"),
                 "--out", str(tmp_path / "exported")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32)
    exported = hf_logits(reloaded, tokens)
    assert exported.shape[-1] == 97  # the reserved pad row travels, with a token of its own
    np.testing.assert_array_equal(exported[..., :96], reference)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    assert hf_tok.pad_token_id == 96 and hf_tok.eos_token_id == 2
    assert reloaded.config.pad_token_id == 96
