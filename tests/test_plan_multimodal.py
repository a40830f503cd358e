"""The multimodal plan (issue 29): the SFT step's batch carries images, and the vision tower's reported cost is the
tower's own.

* The tower's parameter count (plan.vision_param_count, from the config) equals the `vision` subtree of the
  model's abstract params, and its FLOPs per image (plan.vision_flops_per_image) equal the matmul FLOPs of the
  tower's own traced program: the dot_generals of its jaxpr, scan bodies times their trip count, forward alone
  and forward + backward (the gradient of a scalar of its output w.r.t. its params), frozen or not.
* The slow test plan-compiles a small multimodal experiment for v5p:2x2x1 with the TPU compiler (in a subprocess,
  about 20 s): the images are an argument of the compiled program, split by rows over (data, fsdp); the tower's
  weight matrices are sharded (only its norms and biases replicate); the reported counts equal the ones above;
  the reward-model phase is marked as not planned, since its builder takes no images yet.
"""

import dataclasses
import importlib.util
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import pytest

from instruct_jax import plan
from instruct_jax.model.config import ModelConfig, VisionConfig
from instruct_jax.model.presets import LLAMA3_IMAGE_TOKEN, param_count, preset, vision_preset
from instruct_jax.model.vision import VisionTower
from instruct_jax.parallel.sharding import unbox

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) missing")

# 128-wide minor dimensions (TPU tiles); two 128-wide tower heads split over tensor 2, two image slots per row.
VISION = dict(image_size=32, patch_size=8, d_model=256, num_layers=2, num_heads=2, mlp_dim=512, projector="mlp",
              max_images=2, image_token_id=1000)
DECODER = dict(d_model=256, num_heads=8, num_kv_heads=8, head_dim=128, mlp_dim=512, vocab_size=1024,
               dtype="bfloat16", remat="full")
EXPERIMENT = f"""
from instruct_jax.config import Config, TrainConfig
from instruct_jax.model.config import ModelConfig, VisionConfig
from instruct_jax.parallel.mesh import MeshConfig


def get_config(arg=None):
    return Config(name="plan-multimodal-test", model=ModelConfig(**{DECODER!r}, vision=VisionConfig(**{VISION!r})),
                  mesh=MeshConfig(data=1, fsdp=2, tensor=2), train=TrainConfig(seq_len=128, global_batch_size=8))
"""


def dot_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general in a (closed) jaxpr; a scan's body counts `length` times."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        total += trips * sum(dot_flops(sub) for sub in jex.core.jaxprs_in_params(eqn.params))
    return total


def tower_program_flops(model: ModelConfig) -> tuple[float, float]:
    """(forward, forward + backward) matmul FLOPs of one image through the tower, read from its traced program."""
    tower = VisionTower(model)
    v = model.vision
    image = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.channels), jnp.float32)
    params = unbox(jax.eval_shape(tower.init, jax.random.PRNGKey(0), image))["params"]
    forward = jax.make_jaxpr(lambda p, x: tower.apply({"params": p}, x))(params, image)
    train = jax.make_jaxpr(jax.grad(lambda p, x: tower.apply({"params": p}, x).astype(jnp.float32).sum()))(params,
                                                                                                          image)
    return dot_flops(forward), dot_flops(train)


def tower_params_in_model(model: ModelConfig) -> int:
    """The `vision` subtree of the whole model's abstract params: the model with the tower minus without it."""
    return param_count(model) - param_count(dataclasses.replace(model, vision=VisionConfig()))


CASES = {
    "mlp": ModelConfig(**DECODER, vision=VisionConfig(**VISION)),
    "linear-frozen": ModelConfig(**DECODER, vision=VisionConfig(**{**VISION, "projector": "linear", "freeze": True})),
    "mlp-frozen": ModelConfig(**DECODER, vision=VisionConfig(**{**VISION, "freeze": True})),
    "llava-features": ModelConfig(**DECODER, vision=VisionConfig(**{**VISION, "num_layers": 3, "feature_layer": -2,
                                                                    "feature_select": "default"})),
    "8b-siglip-so400m": preset("8b", dtype="bfloat16", vision=vision_preset(
        "siglip-so400m-224", image_token_id=LLAMA3_IMAGE_TOKEN)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vision_cost_is_the_towers_own_program(name):
    model = CASES[name]
    assert plan.vision_param_count(model) == tower_params_in_model(model)
    forward, train = tower_program_flops(model)
    counted = plan.vision_flops_per_image(model)
    assert counted["forward"] == forward and counted["train"] == train, (counted, forward, train)


def test_siglip_so400m_preset_is_412m_params_and_256_tokens_per_image():
    model = CASES["8b-siglip-so400m"]
    v = model.vision
    assert v.tokens_per_image == 256 and 8 * 128 * 1024 > v.image_token_id > 128009  # a reserved Llama 3 id
    projector = v.d_model * model.d_model + model.d_model + model.d_model ** 2 + model.d_model
    assert abs((plan.vision_param_count(model) - projector) / 412.4e6 - 1) < 0.001


@pytest.mark.slow
@needs_libtpu
def test_multimodal_sft_plan_on_v5p_takes_sharded_images(capfd, tmp_path):
    (tmp_path / "mm_plan.py").write_text(EXPERIMENT)
    result = plan.run_in_subprocess(str(tmp_path / "mm_plan.py"), "v5p:2x2x1", phases=("sft", "rm"), timeout=300)
    text = capfd.readouterr().err
    assert result["chip"] == "TPU v5p" and result["mesh"] == {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
    sft, rm = result["phases"]
    assert "error" not in sft, sft
    assert rm["skipped"] and rm["pieces"] == [] and "[rm] not planned" in text

    # The images are a parameter of the compiled program (its HLO), rows split over (data, fsdp) = 2 pieces, the
    # rest whole: [8, 2, 32, 32, 3] -> [4, 2, 32, 32, 3] per device, as the token arrays' rows.
    images, tokens = sft["inputs"]["images"], sft["inputs"]["tokens"]
    assert images["used"] and images["shape"] == [8, 2, 32, 32, 3] and images["hlo_dtype"] == "f32"
    assert images["spec_axes"][0] == ["data", "fsdp"] and not any(images["spec_axes"][1:])
    assert images["pieces"] == [2, 1, 1, 1, 1] and images["per_device_shape"] == [4, 2, 32, 32, 3]
    assert images["bytes_per_device"] == 4 * 2 * 32 * 32 * 3 * 4
    assert tokens["pieces"][0] == 2 and tokens["per_device_shape"] == [4, 128]
    piece = sft["pieces"][0]
    tokens_batch = 5 * (8 // 2) * 128 * 4
    state = sft["params_bytes"] + sft["optimizer_bytes"]
    assert state + tokens_batch + images["bytes_per_device"] <= piece["argument"] <= 1.05 * (
        state + tokens_batch + images["bytes_per_device"])

    # The tower's counts are the independent ones; its weight matrices are sharded, only norms and biases are not.
    model = ModelConfig(**DECODER, vision=VisionConfig(**VISION))
    vision = sft["vision"]
    assert vision["params"] == vision["params_in_state"] == tower_params_in_model(model)
    forward, train = tower_program_flops(model)
    assert vision["flops_forward_per_image"] == forward and vision["flops_train_per_image"] == train
    assert vision["images_per_step"] == 16 and vision["flops_per_step"] == 16 * train
    assert all(len(shape) <= 2 and shape[-1] == VISION["d_model"] for _, shape, _ in vision["replicated"])
    assert vision["params_bytes_per_device"] < 0.4 * vision["params_bytes"]  # split 4 ways, norms/biases aside
    decoder, _ = plan.train_flops(model, 128, 8 * 128, 4)
    assert piece["flops_model"] == pytest.approx(decoder + 16 * train / 4)
    assert vision["share_of_step_flops"] == pytest.approx(16 * train / 4 / piece["flops_model"])
    assert "vision tower: 1.2M params" in text and "images input [8, 2, 32, 32, 3] float32" in text
    assert f"parameter {images['parameter']} of the compiled program, [4, 2, 32, 32, 3] per chip" in text
