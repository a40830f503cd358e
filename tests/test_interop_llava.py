"""LLaVA import (interop/llava.py): logits parity with transformers' LlavaForConditionalGeneration on image + text
and text-only prompts, for LLaVA's feature settings, both tensor namings, the CLI, and unsupported configs named.

The reference is transformers (PyTorch, CPU, float32) running the checkpoint it saved: a tiny random SigLIP tower
(16 px images, 4 px patches: 16 patches) in front of a tiny Llama. Weights are drawn large enough that logits
spread out, so a layout bug (a transposed conv kernel, a wrong feature layer, a kept first token) cannot hide
under 1e-4.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from instruct_jax.config import Config, validate
from instruct_jax.errors import ConfigError
from instruct_jax.interop import UnsupportedConfig, import_hf
from instruct_jax.interop.llava import llava_model_config
from instruct_jax.interop.safetensors_io import SafetensorsCheckpoint, write_checkpoint
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.mesh import MeshConfig, make_mesh

LOGIT_TOL = 1e-4
VOCAB, IMAGE_TOKEN = 300, 299
VISION = dict(model_type="siglip_vision_model", image_size=16, patch_size=4, num_channels=3, hidden_size=32,
              intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, layer_norm_eps=1e-6)
TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
CASES = {  # LLaVA's defaults; the last layer with every patch, no projector biases and a tied head
    "layer-2-default": dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "layer-1-full": dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                         multimodal_projector_bias=False, tie_word_embeddings=True),
}


def build_llava(case: dict, seed: int = 0):
    """A transformers LLaVA of this case with random weights that make logits spread out (std 0.15 weights,
    norms around 1, biases around 0: the default init gives near-uniform logits)."""
    text = dict(TEXT, tie_word_embeddings=bool(case.get("tie_word_embeddings")))
    config = transformers.LlavaConfig(vision_config=VISION, text_config=text, image_token_index=IMAGE_TOKEN, **case)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_norm = "norm" in name.split(".")[-2]
            p.copy_(1.0 + 0.2 * noise if is_norm and name.endswith("weight") else
                    0.3 * noise if name.endswith("bias") else 0.15 * noise)
    return model.eval()


def prompts(cfg: ModelConfig, images_per_row: list[int], seed: int = 0) -> np.ndarray:
    """[B, T] token ids: per row, text, then per image tokens_per_image copies of the image token (as LLaVA's
    processor expands `<image>`) and more text."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in images_per_row:
        row = list(rng.integers(3, IMAGE_TOKEN, 3))
        for _ in range(n):
            row += [IMAGE_TOKEN] * cfg.vision.tokens_per_image + list(rng.integers(3, IMAGE_TOKEN, 4))
        rows.append(row)
    width = max(map(len, rows))
    return np.array([r + list(rng.integers(3, IMAGE_TOKEN, width - len(r))) for r in rows], np.int32)


def hf_logits(model, tokens: np.ndarray, pixel_values: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        pixels = None if pixel_values is None else torch.tensor(pixel_values)
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), pixel_values=pixels).logits.numpy()


def jax_logits(params, cfg: ModelConfig, tokens, images=None, mesh=None, rules=()) -> np.ndarray:
    def forward(p, x, im):
        return Transformer(cfg).apply({"params": p}, dataclasses.replace(ModelInput.unpacked(x), images=im)).logits

    if mesh is None:
        return np.asarray(jax.jit(forward)(params, jnp.asarray(tokens), images))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return np.asarray(jax.jit(forward)(params, jnp.asarray(tokens), images))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (transformers model, the folder it saved), each built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = build_llava(CASES[name])
            folder = tmp_path_factory.mktemp(name) / "hf"
            model.save_pretrained(folder)
            cache[name] = model, folder
        return cache[name]

    return get


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_image_and_text_logits_match_transformers(saved, name):
    model, folder = saved(name)
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)  # every leaf read shard by shard
    mesh, rules = make_mesh(mesh_cfg, jax.devices()), mesh_cfg.logical_rules()
    params, cfg = import_hf(str(folder), mesh=mesh, rules=rules, max_images=2)
    v = cfg.vision
    assert (v.feature_layer, v.feature_select, v.image_token_id, v.max_images) == (
        CASES[name]["vision_feature_layer"], CASES[name]["vision_feature_select_strategy"], IMAGE_TOKEN, 2)
    assert v.tokens_per_image == (15 if v.feature_select == "default" else 16)
    assert params["vision"]["layers"]["q"].shape[0] == v.depth == 3 + 1 + v.feature_layer
    assert ("post_norm" in params["vision"]) == (v.feature_layer == 0)

    # Row 0 holds two images, row 1 one (its second slot is noise that placement must never read).
    ours = np.random.default_rng(1).normal(size=(2, 2, 16, 16, 3)).astype(np.float32)  # [B, M, H, W, C]
    used = np.stack([ours[0, 0], ours[0, 1], ours[1, 0]])  # HF: every image of the batch, in token order
    tokens = prompts(cfg, [2, 1])
    reference = hf_logits(model, tokens, used.transpose(0, 3, 1, 2))  # [N, C, H, W]
    got = jax_logits(params, cfg, tokens, jnp.asarray(ours), mesh, rules)
    diff = max_diff(got, reference)
    print(f"{name}: image prompt max |logit diff| = {diff:.2e} (logits up to {np.abs(reference).max():.1f})")
    assert diff <= LOGIT_TOL

    # The image reaches the logits: another image in row 1 changes them (so the parity above is not vacuous).
    other = ours.copy()
    other[1, 0] = -other[1, 0]
    assert max_diff(jax_logits(params, cfg, tokens, jnp.asarray(other), mesh, rules)[1], got[1]) > 1e-2

    # A text-only prompt: no pixel values, no image tokens.
    text = np.random.default_rng(2).integers(3, IMAGE_TOKEN, (2, 20)).astype(np.int32)
    diff = max_diff(jax_logits(params, cfg, text, None, mesh, rules), hf_logits(model, text))
    print(f"{name}: text-only max |logit diff| = {diff:.2e}")
    assert diff <= LOGIT_TOL


def rename(name: str) -> str:
    """transformers 4.5x's LLaVA tensor names (and the llava-hf hub's `vision_model.` level) from 5.x's."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


@pytest.mark.parametrize("name", list(CASES))
def test_older_tensor_names_import_the_same_params(saved, name, tmp_path):
    _, folder = saved(name)
    ckpt = SafetensorsCheckpoint(str(folder))
    old = {rename(n): n for n in ckpt.names()}
    assert any(n.startswith("model.vision_tower.vision_model.") for n in old)
    (tmp_path / "old").mkdir()
    write_checkpoint(str(tmp_path / "old"), [(n, ckpt.shape(old[n]), np.dtype(np.float32)) for n in sorted(old)],
                     lambda n: ckpt.read(old[n]))
    (tmp_path / "old" / "config.json").write_text((folder / "config.json").read_text())
    expected, cfg = import_hf(str(folder))
    got, cfg_old = import_hf(str(tmp_path / "old"))
    assert cfg_old == cfg
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_cli_import_writes_the_vision_config_and_params(saved, tmp_path):
    from instruct_jax.__main__ import main
    from instruct_jax.checkpoint import load_params
    from instruct_jax.interop.hf import target_params

    _, folder = saved("layer-2-default")
    assert main(["interop", "import", str(folder), "--out", str(tmp_path / "imported")]) == 0
    meta = json.loads((tmp_path / "imported" / "model.json").read_text())
    cfg = ModelConfig(**meta["model"])
    expected, expected_cfg = import_hf(str(folder))
    assert cfg.vision == expected_cfg.vision and cfg.vision.tokens_per_image == 15  # (JSON gives lists for tuples)
    assert (cfg.num_layers, cfg.d_model, cfg.vocab_size) == (expected_cfg.num_layers, expected_cfg.d_model, VOCAB)
    mesh, rules = make_mesh(MeshConfig(), jax.devices()), MeshConfig().logical_rules()
    params = load_params(str(tmp_path / "imported" / "params"), target_params(cfg, mesh, rules)[0])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, expected)


# ----------------------------------------------------------------------------- unsupported configs named
def llava_config_json(**changes) -> dict:
    """The config.json LLaVA's save_pretrained writes for CASES' first case, with changes."""
    config = transformers.LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE_TOKEN,
                                      **CASES["layer-2-default"]).to_dict()
    return {**config, **changes}


@pytest.mark.parametrize("changes,key", [
    (dict(vision_config=transformers.CLIPVisionConfig(image_size=16, patch_size=4).to_dict()),
     "vision_config.model_type"),
    (dict(vision_feature_select_strategy="pooled"), "vision_feature_select_strategy"),
    (dict(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
    (dict(vision_feature_layer=-5), "vision_feature_layer"),
    (dict(vision_feature_layer=0), "vision_feature_layer"),
    (dict(projector_hidden_act="relu"), "projector_hidden_act"),
    (dict(vision_config=dict(VISION, hidden_act="quick_gelu")), "vision_config.hidden_act"),
    (dict(text_config=dict(TEXT, hidden_act="gelu")), "text_config.hidden_act"),
])
def test_unsupported_llava_configs_name_their_key(changes, key):
    with pytest.raises(UnsupportedConfig) as e:
        llava_model_config(llava_config_json(**changes))
    assert e.value.key == key


def test_llava_feature_settings_map_and_bad_ones_are_named():
    v = llava_model_config(llava_config_json()).vision
    assert (v.num_layers, v.feature_layer, v.depth, v.num_patches, v.tokens_per_image) == (3, -2, 2, 16, 15)
    assert llava_model_config(llava_config_json(vision_feature_layer=2)).vision.feature_layer == -2  # 2 of 0..3
    with pytest.raises(ConfigError) as e:
        llava_model_config(llava_config_json(image_token_index=VOCAB))
    assert e.value.field == "model.vision.image_token_id"
    cfg = llava_model_config(llava_config_json())
    for change, field in ((dict(feature_layer=-4), "model.vision.feature_layer"),
                          (dict(feature_layer=1), "model.vision.feature_layer"),
                          (dict(feature_select="cls"), "model.vision.feature_select"),
                          (dict(image_size=4, feature_select="default"), "model.vision.feature_select")):
        with pytest.raises(ConfigError) as e:
            validate(Config(model=dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **change))))
        assert e.value.field == field
