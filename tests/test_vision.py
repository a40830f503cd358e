"""Image inputs, the model (issue 29, item 1): the vision tower against a numpy reference, placement on a worked
example, a text-only batch through the multimodal model equal to the text-only model, the cached image prefill
equal to a full forward, the tower sharded on 8 devices equal to one device, bad settings named."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.config import Config, validate
from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ModelConfig, VisionConfig
from instruct_jax.model.kv_cache import KVCache
from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
from instruct_jax.model.vision import VisionTower, patchify, place_images
from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.mesh import MeshConfig, make_mesh
from instruct_jax.parallel.sharding import param_shardings_for, unbox

IMAGE = 60  # the image placeholder token
VISION = VisionConfig(image_size=8, patch_size=4, channels=3, d_model=16, num_layers=2, num_heads=2, mlp_dim=32,
                      max_images=2, image_token_id=IMAGE)  # 4 image tokens per image
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=32, vision=VISION, init_std=0.2)


def init(cfg=CFG, seed=0):
    return unbox(init_params_boxed(Transformer(cfg), jax.random.PRNGKey(seed)))


def images(b, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, VISION.max_images, 8, 8, 3)), jnp.float32)


# ----------------------------------------------------------------------------- numpy reference of the tower
def _ln(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def naive_tower(params, image, v: VisionConfig, projector: str):
    """One image [H, W, C] -> [P, D]: a loop over patches, heads and layers in float64."""
    p = {k: np.asarray(x, np.float64) if not isinstance(x, dict) else x for k, x in params.items()}
    s = v.patch_size
    patches = [np.asarray(image[i:i + s, j:j + s, :], np.float64).reshape(-1)
               for i in range(0, v.image_size, s) for j in range(0, v.image_size, s)]
    x = np.stack(patches) @ p["patch_embedding"] + p["patch_bias"] + p["position_embedding"]
    layers = jax.tree.map(lambda a: np.asarray(a, np.float64), params["layers"])
    heads, hd = v.num_heads, v.d_model // v.num_heads
    for li in range(v.num_layers):
        lp = jax.tree.map(lambda a, li=li: a[li], layers)
        y = _ln(x, lp["attn_norm"], v.norm_eps)
        out = np.zeros_like(x)
        for h in range(heads):
            q = y @ lp["q"][:, h] + lp["q_bias"][h]
            k = y @ lp["k"][:, h] + lp["k_bias"][h]
            val = y @ lp["v"][:, h] + lp["v_bias"][h]
            scores = q @ k.T / math.sqrt(hd)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            out += (w / w.sum(-1, keepdims=True)) @ val @ lp["o"][h]
        x = x + out + lp["o_bias"]
        y = _ln(x, lp["mlp_norm"], v.norm_eps)
        x = x + _gelu_tanh(y @ lp["fc1"] + lp["fc1_bias"]) @ lp["fc2"] + lp["fc2_bias"]
    x = _ln(x, jax.tree.map(lambda a: np.asarray(a, np.float64), params["post_norm"]), v.norm_eps)
    x = x @ p["projector_1"] + p["projector_1_bias"]
    if projector == "mlp":
        gelu = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
        x = gelu @ p["projector_2"] + p["projector_2_bias"]
    return x


@pytest.mark.parametrize("projector", ["mlp", "linear"])
def test_vision_tower_equals_a_numpy_loop_over_patches_heads_and_layers(projector):
    cfg = dataclasses.replace(CFG, vision=dataclasses.replace(VISION, projector=projector))
    params = init(cfg)["vision"]
    batch = np.asarray(images(1, seed=4)[0])  # two images
    got = VisionTower(cfg).apply({"params": params}, jnp.asarray(batch))
    assert got.shape == (2, VISION.num_patches, CFG.d_model)
    for n in range(2):
        np.testing.assert_allclose(np.asarray(got[n]), naive_tower(params, batch[n], cfg.vision, projector),
                                   rtol=2e-4, atol=2e-4)
    # patchify is the row-major patch order the loop uses
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(patchify(x, 4)[1, 1]), np.asarray(x[1, 0:4, 4:8, :]).reshape(-1))


def test_placement_on_a_worked_example():
    """Image token 9, P = 2, two slots: row 0 holds both images, row 1 one image (its second slot unused)."""
    tokens = jnp.asarray([[5, 9, 9, 6, 9, 9], [9, 9, 7, 8, 3, 0]])
    x = jnp.broadcast_to(jnp.arange(6, dtype=jnp.float32)[None, :, None], (2, 6, 3))  # text: its position
    embeds = 100.0 + jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)  # [B, M * P, D]
    out = np.asarray(place_images(x, tokens, embeds, 9))
    np.testing.assert_array_equal(out[0, [1, 2, 4, 5]], np.asarray(embeds[0]))  # slot 0 then slot 1, in order
    np.testing.assert_array_equal(out[0, [0, 3]], np.asarray(x[0, [0, 3]]))
    np.testing.assert_array_equal(out[1, [0, 1]], np.asarray(embeds[1, :2]))  # slot 1's tokens never placed
    np.testing.assert_array_equal(out[1, 2:], np.asarray(x[1, 2:]))


def test_text_only_batch_equals_the_text_only_model_with_the_same_weights():
    params = init()
    text_cfg = dataclasses.replace(CFG, vision=VisionConfig())
    text_params = {k: v for k, v in params.items() if k != "vision"}
    assert set(init(text_cfg)) == set(text_params)  # the tower adds the "vision" subtree alone
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 59, (3, 10)), jnp.int32)
    inputs = ModelInput.unpacked(tokens)
    want = Transformer(text_cfg).apply({"params": text_params}, inputs).logits
    got = Transformer(CFG).apply({"params": params}, inputs).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # images beside a batch with no image tokens change nothing either
    with_images = Transformer(CFG).apply({"params": params}, inputs.replace(images=images(3))).logits
    np.testing.assert_array_equal(np.asarray(with_images), np.asarray(want))


def _image_prompt(b=2):
    """Rows: text, one image's 4 tokens, text (row 1 also a second image): left-padded to 12."""
    rows = [[3, 4] + [IMAGE] * 4 + [5, 6], [7] + [IMAGE] * 4 + [8] + [IMAGE] * 4 + [9]][:b]
    tokens = np.zeros((b, 12), np.int32)
    for i, r in enumerate(rows):
        tokens[i, 12 - len(r):] = r
    return ModelInput.left_padded(jnp.asarray(tokens), jnp.asarray([len(r) for r in rows]))


def test_images_reach_the_logits_and_the_cached_prefill_equals_a_full_forward():
    params, model = init(), Transformer(CFG)
    prompt = _image_prompt().replace(images=images(2, seed=1))
    full = model.apply({"params": params}, prompt).logits
    other = model.apply({"params": params}, prompt.replace(images=images(2, seed=2))).logits
    assert float(jnp.max(jnp.abs(full[:, -1] - other[:, -1]))) > 1e-3  # the answer depends on the image
    # prefill the prompt with its images into a cache, then decode one token: the same logits as one forward
    # over prompt + token (the image tokens' keys / values are in the cache; decode steps carry no images)
    first = model.apply({"params": params}, prompt, cache=KVCache.init(CFG, 2, 16), write_index=0)
    real = np.asarray(prompt.segment_ids) > 0  # padding rows see nothing: their logits mean nothing
    np.testing.assert_allclose(np.asarray(first.logits)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)
    nxt = jnp.asarray([[11], [12]], jnp.int32)
    step = ModelInput(nxt, jnp.max(prompt.positions, axis=1, keepdims=True) + 1, jnp.ones((2, 1), jnp.int32))
    second = model.apply({"params": params}, step, cache=first.cache, write_index=12)
    longer = ModelInput(jnp.concatenate([prompt.tokens, nxt], 1), jnp.concatenate([prompt.positions, step.positions], 1),
                        jnp.concatenate([prompt.segment_ids, step.segment_ids], 1), images=prompt.images)
    want = model.apply({"params": params}, longer).logits[:, -1]
    np.testing.assert_allclose(np.asarray(second.logits[:, -1]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_tower_shards_with_the_decoders_rules_and_8_devices_equal_1():
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg, jax.devices()[:8])
    rules = mesh_cfg.logical_rules()
    abstract, shardings = param_shardings_for(lambda rng: init_params_boxed(Transformer(CFG), rng), mesh, rules)
    v = shardings["vision"]
    assert v["layers"]["q"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # [L, D, N, H]
    assert v["layers"]["fc1"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert v["projector_1"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    params = init()
    prompt = _image_prompt().replace(images=images(2, seed=1))
    want = Transformer(CFG).apply({"params": params}, prompt).logits
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    rows = jax.tree.map(lambda x: jnp.concatenate([x] * 2), prompt)  # 4 rows over the 4 batch shards
    with mesh_and_rules(mesh, rules):
        got = jax.jit(lambda p, i: Transformer(CFG).apply({"params": p}, i).logits,
                      in_shardings=(shardings, batch))(jax.device_put(params, shardings), jax.device_put(rows, batch))
    np.testing.assert_allclose(np.asarray(got)[:2], np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[2:], np.asarray(want), rtol=1e-5, atol=1e-5)


def test_frozen_tower_gets_no_gradient_and_the_projector_does():
    cfg = dataclasses.replace(CFG, vision=dataclasses.replace(VISION, freeze=True))
    params = init(cfg)
    prompt = _image_prompt().replace(images=images(2, seed=1))
    grads = jax.grad(lambda p: jnp.sum(Transformer(cfg).apply({"params": p}, prompt).logits[:, -1] ** 2))(params)
    g = grads["vision"]
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(g["layers"]))
    assert float(jnp.max(jnp.abs(g["patch_embedding"]))) == 0
    assert float(jnp.max(jnp.abs(g["projector_1"]))) > 0


@pytest.mark.parametrize("override,field", [
    (dict(patch_size=3), "model.vision.patch_size"),
    (dict(num_heads=3), "model.vision.num_heads"),
    (dict(projector="perceiver"), "model.vision.projector"),
    (dict(image_token_id=64), "model.vision.image_token_id"),
    (dict(num_layers=0), "model.vision.num_layers"),
])
def test_bad_vision_settings_name_their_field(override, field):
    cfg = Config(model=dataclasses.replace(CFG, vision=dataclasses.replace(VISION, **override)))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.field == field


# ----------------------------------------------------------------------------- images as data
def test_every_image_form_loads_to_the_same_normalised_pixels(tmp_path):
    """A path, PNG bytes, a uint8 array, a [0, 1] float array, a PIL image and a datasets Image dict give the same
    [size, size, 3] float32 in [-1, 1]; a constant image stays constant through the resize."""
    from PIL import Image

    from instruct_jax.data.images import load_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    forms = [str(path), data, pixels, pixels / 255.0, Image.fromarray(pixels), {"bytes": data, "path": None},
             {"bytes": None, "path": str(path)}]
    first = load_image(forms[0], 8)
    assert first.shape == (8, 8, 3) and first.dtype == np.float32 and -1 <= first.min() < first.max() <= 1
    for form in forms[1:]:
        np.testing.assert_allclose(load_image(form, 8), first, atol=1e-6)
    grey = load_image(np.full((5, 7), 51, np.uint8), 8)  # H x W: grey to RGB; 51 / 255 = 0.2 -> -0.6
    np.testing.assert_allclose(grey, np.full((8, 8, 3), -0.6, np.float32), atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (b"not an image", "cannot read the image"),
    (np.full((4, 4), 2.0), "floats in \\[0, 1\\]"),
    (np.zeros((4, 4, 5), np.uint8), "got shape"),
    ({"bytes": None, "path": None}, "needs 'bytes' or 'path'"),
    (3.5, "got float"),
])
def test_unreadable_images_are_named(bad, match):
    from instruct_jax.data.images import load_image
    from instruct_jax.data.stats import MalformedDataError

    with pytest.raises(MalformedDataError, match=match):
        load_image(bad, 8)


def test_marker_and_image_counts_must_agree_and_the_row_is_named():
    from instruct_jax.data.images import check_image_markers
    from instruct_jax.data.stats import MalformedDataError

    two = [{"role": "user", "content": "<image> then <image>: which is larger?"}, {"role": "assistant", "content": "x"}]
    check_image_markers(two, ["a", "b"], "chat.jsonl:3", max_images=2)
    with pytest.raises(MalformedDataError) as e:
        check_image_markers(two, ["a"], "chat.jsonl:3", max_images=2)
    assert str(e.value) == ("chat.jsonl:3: field 'images': 2 image marker(s) '<image>' in the messages but 1 "
                            "image(s)")
    with pytest.raises(MalformedDataError, match="chat.jsonl:4: field 'images': 2 images, more than "
                                                 "model.vision.max_images=1"):
        check_image_markers(two, ["a", "b"], "chat.jsonl:4", max_images=1)
