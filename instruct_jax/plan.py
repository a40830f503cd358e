"""Ahead-of-time plans for TPU pods: compile the SFT, reward-model and PPO steps for a real TPU
topology on a CPU-only machine and report what each chip would hold.

    python -m instruct_jax plan --experiment experiments/palm.py:540b-v5p --topology v5p:16x16x24
    python -m instruct_jax plan --experiment experiments/palm.py:540b-v4 --topology v4:16x16x12 --slices 2

How: libtpu (the optional `tpu` extra) describes any TPU topology without TPUs
(jax.experimental.topologies.get_topology_desc); the experiment's own jitted steps, built by the very
builders the trainers call (build_lm, build_rm, build_ppo: tests/test_plan_equals_train.py), are lowered with abstract, sharded inputs over a mesh of those devices
and compiled by the real TPU compiler. Its memory_analysis() gives each device's argument, output,
aliased (donated) and temporary bytes; its cost_analysis() the FLOPs each device executes.

The compile runs in a subprocess with JAX_PLATFORMS=cpu, so the calling process (a test on 8
emulated CPU devices, say) never loads the TPU plugin. The reward step compiles the experiment's
config with train.global_batch_size comparisons of K = max(data.max_responses, 2) responses; PPO
with train.global_batch_size prompts of data.max_prompt_len tokens and ppo.response_len responses.

Per device, for each compiled step:
    params, optimizer state    bytes of the resident trees, from their shapes and shardings;
                               for PPO all four models (policy, value, reference, reward) + EMA
    other inputs / outputs     batch, experience, rollout buffers that are not aliased
    temporaries                the compiler's temp_size (activations, gradients, collectives)
    total                      arguments + outputs - aliased + temporaries + code
                               (+ resident trees the step does not take as arguments)
FLOPs per step per device: the model's own count (metrics.model_flops_per_token, PaLM appendix B),
the hardware count (model + what remat recomputes: a layer's forward pass for remat=full, the
attention matmuls for dots_no_batch), and the compiler's cost_analysis. XLA counts the body of
every loop ONCE (measured: a 2-layer and an 8-layer scan report the same FLOPs), so with scanned
layers, microbatches and decode loops its number is a per-iteration figure, printed as a check,
not used.

With model.vision on (issue 29), the SFT batch carries the image slots the train step declares (images
[B, M, H, W, C] float32, image_mask [B, M], rows over batch), read back from the compiled program's entry
parameters; the report adds the tower's params (from the config and the sharded state), its bytes per device
and unsplit leaves, and its matmul FLOPs per image and per step, which the step's FLOPs include. The reward
model, DPO and PPO builders take no images yet: a vision experiment plans SFT only (IMAGE_PHASES).

Communication per device per step, read from the compiled program (parallel/collectives.py): every
collective with the loops around it (decode loop, loss-chunk loop, layer scan, minibatches) and their
trip counts, bytes within a slice (ICI) and across slices (DCN), and which ones re-send loop-invariant
data (a weight or a slice of one) on every iteration. Floors: hardware FLOPs / peak, ICI bytes at the
chip's ICI bandwidth, DCN bytes at its DCN bandwidth; MFU<= is model FLOPs at peak over the largest floor
(perfect overlap assumed, HBM bandwidth ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Optional, Sequence

GIB = 2 ** 30
PHASES = ("sft", "rm", "ppo")


# ----------------------------------------------------------------------------- chips
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    ici_bytes_per_s: float  # bidirectional inter-chip interconnect bandwidth per chip
    dcn_bytes_per_s: Optional[float]  # data-center network bandwidth per chip (None: not published)


# Public Cloud TPU specifications (cloud.google.com/tpu/docs/<version>), keyed by jax's device_kind. ICI:
# "bidirectional ICI bandwidth per chip"; v4 publishes none, so it is the pod's all-reduce bandwidth / its
# chips (1.1 PB/s / 4,096). DCN: v5p 50 Gbps per chip; v5e 2 x 100 Gbps NICs per 8-chip host.
CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GIB, 275e12, 1.1e15 / 4096, None),
    "TPU v5 lite": Chip("TPU v5e", 16 * GIB, 197e12, 400e9, 25e9 / 8),
    "TPU v5": Chip("TPU v5p", 95 * GIB, 459e12, 1200e9, 50e9 / 8),
    "TPU v6 lite": Chip("TPU v6e", 32 * GIB, 918e12, 800e9, None),
}


class PlanError(RuntimeError):
    """Planning cannot start (libtpu missing, unknown topology); the message says what to do."""


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("plan needs libtpu, the TPU compiler, which the core install leaves out. Install the "
                        "optional extra:  pip install -e '.[tpu]'   (or: pip install libtpu==0.0.42.1, the "
                        "version jax 0.10.2 pins)")


def load_topology(name: str, slices: int = 1):
    """Devices of a TPU topology ("v5p:8x8x8") without TPUs; `slices` > 1 gives a multi-slice job."""
    require_libtpu()
    from jax.experimental import topologies

    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu raises its own error types
        raise PlanError(f"--topology {name!r} (slices {slices}): libtpu cannot describe it: {e}") from None


def devices_per_chip(topology: str, num_devices: int, slices: int) -> int:
    """Devices jax sees per chip: 1 on megacore chips (v5p), 2 TensorCores on v4 topologies here."""
    dims = topology.partition(":")[2].split("x")
    chips = math.prod(int(d) for d in dims) * slices
    return max(num_devices // chips, 1)


# ----------------------------------------------------------------------------- abstract inputs
def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays (the largest shard)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def lm_batch(cfg, mesh, rules, images: bool = True) -> dict:
    """An abstract SFT / pretraining batch with the shardings the train step's jit declares for it
    (train/step.py lm_batch_shardings): LM_KEYS arrays [global_batch_size, seq_len], rows over batch; with
    model.vision on (and `images`), the image slots too, rows over batch only: "images" [B, M, H, W, C] float32
    (ModelInput.images) and "image_mask" [B, M] int32 (1 = a used slot), M = vision.max_images."""
    import jax.numpy as jnp

    from instruct_jax.train.step import lm_batch_shardings

    b, t, v = cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vision
    shapes = {"images": ((b, v.max_images, v.image_size, v.image_size, v.channels), jnp.float32),
              "image_mask": ((b, v.max_images), jnp.int32), "loss_mask": ((b, t), jnp.float32)}
    batch = {}
    for key, sh in lm_batch_shardings(mesh, rules, cfg.model).items():
        if key in ("images", "image_mask") and not images:
            continue
        shape, dtype = shapes.get(key, ((b, t), jnp.int32))
        batch[key] = abstract(shape, dtype, sh)
    return batch


def ranking_slots(cfg) -> int:
    """K responses per comparison: data.max_responses when set, else a pair."""
    return max(cfg.data.max_responses or 2, 2)


def ranking_batch(cfg, mesh, rules) -> dict:
    """An abstract reward-model batch: [B, K, T] sequences and [B, K] ranks / lengths."""
    import jax.numpy as jnp

    from instruct_jax.train.rm.ranking import ranking_shardings

    b, k, t = cfg.train.global_batch_size, ranking_slots(cfg), cfg.train.seq_len
    sh = ranking_shardings(mesh, rules)
    return {name: abstract((b, k, t) if name in ("tokens", "positions", "segment_ids") else (b, k), jnp.int32,
                           sh[name]) for name in sh}


# ----------------------------------------------------------------------------- compile and measure
@dataclasses.dataclass
class Piece:
    """One compiled function: what the compiler says it needs per device."""

    name: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    resident_elsewhere: int  # resident trees (frozen models, optimizer states) this function doesn't take
    flops_compiler: float  # XLA's cost_analysis: loop bodies counted once
    flops_model: float
    flops_hardware: float  # model + remat recomputation
    compile_s: float
    ici_bytes: float = 0.0  # collective bytes per device per step within a slice (parallel/collectives.py)
    dcn_bytes: float = 0.0  # ... across slices
    loop_collectives: list = dataclasses.field(default_factory=list)  # collectives inside loops, largest first
    attention_heads: list = dataclasses.field(default_factory=list)  # query heads per device in Splash calls

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code + self.resident_elsewhere


def compile_piece(name: str, fn, args: Sequence, flops: tuple[float, float], resident_elsewhere: int = 0):
    """(Piece, compiled) for fn.lower(*args).compile(); flops = (model, hardware) per device."""
    print(f"  compiling {name} ...", file=sys.stderr, flush=True)  # a 540B step takes minutes
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    comm = communication(compiled, args)
    piece = Piece(name, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                  mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, resident_elsewhere,
                  float((cost or {}).get("flops", 0.0)), *flops, seconds, comm["ici_bytes"], comm["dcn_bytes"],
                  comm["in_loops"], comm["attention_heads"])
    return piece, compiled


def communication(compiled, args) -> dict:
    """The compiled program's collectives (parallel/collectives.py summary), each partition placed in its
    device's slice through the mesh of the (abstract, sharded) arguments it was compiled for."""
    import jax

    from instruct_jax.parallel.collectives import attention_heads, collectives, summary

    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(args)]
    meshes = [s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)]
    slice_of = [getattr(d, "slice_index", 0) or 0 for d in meshes[0].devices.flat] if meshes else None
    text = compiled.as_text()
    return {**summary(collectives(text, slice_of)), "attention_heads": attention_heads(text)}


def out_structs(compiled):
    """The compiled function's outputs as sharded ShapeDtypeStructs (inputs for the next piece)."""
    import jax

    return jax.tree.map(lambda s, sh: abstract(s.shape, s.dtype, sh), compiled.out_info, compiled.output_shardings)


def remat_flops_per_token(model_cfg, seq_len: int) -> float:
    """FLOPs per token that remat adds in the backward pass (recomputed forward work).

    full / save_attention_out: each layer's forward again (2 x layer weights + attention);
    dots_no_batch: the attention matmuls (dots with batch dims are not saved); dots / none: nothing.
    """
    from instruct_jax.metrics import model_flops_per_token

    layer_matmuls = model_flops_per_token(model_cfg, 0, output_size=0) / 6  # weights of every layer's matmuls
    attention = (model_flops_per_token(model_cfg, seq_len, output_size=0) - 6 * layer_matmuls) / 3
    return {"full": 2 * layer_matmuls + attention, "save_attention_out": 2 * layer_matmuls + attention,
            "dots_no_batch": attention}.get(model_cfg.remat, 0.0)


def train_flops(model_cfg, seq_len: int, tokens: int, num_devices: int, output_size=None) -> tuple[float, float]:
    """(model, hardware) FLOPs per device of forward + backward over `tokens` tokens."""
    from instruct_jax.metrics import model_flops_per_token

    model = model_flops_per_token(model_cfg, seq_len, output_size=output_size) * tokens / num_devices
    return model, model + remat_flops_per_token(model_cfg, seq_len) * tokens / num_devices


# ----------------------------------------------------------------------------- the vision tower (issue 29)
def vision_param_count(model_cfg) -> int:
    """Parameters of the vision tower and its projector (model/vision.py), counted from the config alone.

    Patch embedding (p^2 C x E + bias) and learned positions (P x E); per block: q, k, v, o (4 E^2, with 4 E of
    biases), fc1 / fc2 (2 E F, biases F + E), two LayerNorms (scale + bias, 4 E); the final LayerNorm (2 E; not
    with a LLaVA feature_layer < 0); the projector E x D + D, and for `mlp` D x D + D more."""
    v, d = model_cfg.vision, model_cfg.d_model
    if not v.enabled:
        return 0
    e, f = v.d_model, v.mlp_dim
    block = 4 * e * e + 4 * e + 2 * e * f + f + e + 4 * e
    embed = v.patch_size ** 2 * v.channels * e + e + v.num_patches * e
    post_norm = 2 * e if v.feature_layer >= 0 else 0
    projector = e * d + d + (d * d + d if v.projector == "mlp" else 0)
    return embed + v.depth * block + post_norm + projector


def vision_flops_per_image(model_cfg) -> dict[str, float]:
    """Matmul FLOPs of one image through the tower and projector: {"forward", "train"} (forward + backward).

    Like metrics.model_flops_per_token (PaLM appendix B): 2 FLOPs per multiply-add, biases, norms, GELU and
    softmax left out. Forward, per image of P patches through `depth` blocks of width E, MLP F:
        patch embedding 2 P (p^2 C) E;  per block 2 P (4 E^2 + 2 E F) + attention 2 x 2 P^2 E (scores, sum over v)
        projector over its T = tokens_per_image tokens: 2 T E D (+ 2 T D^2 for `mlp`)
    Backward costs twice the forward where the input needs a gradient too, once where only the weight does: the
    patch embedding (pixels take no gradient) and, with vision.freeze, the first projector matmul (its input is
    a stop_gradient); a frozen tower itself runs forward only. The tower is not rematerialized (model/vision.py),
    so the hardware count equals this one."""
    v, d = model_cfg.vision, model_cfg.d_model
    if not v.enabled:
        return {"forward": 0.0, "train": 0.0}
    p, e, f, t = v.num_patches, v.d_model, v.mlp_dim, v.tokens_per_image
    patch = 2.0 * p * v.patch_size ** 2 * v.channels * e
    blocks = v.depth * (2.0 * p * (4 * e * e + 2 * e * f) + 4.0 * p * p * e)
    proj_1 = 2.0 * t * e * d
    proj_2 = 2.0 * t * d * d if v.projector == "mlp" else 0.0
    forward = patch + blocks + proj_1 + proj_2
    if v.freeze:
        train = patch + blocks + 2 * proj_1 + 3 * proj_2
    else:
        train = 2 * patch + 3 * (blocks + proj_1 + proj_2)
    return {"forward": forward, "train": train}


def vision_report(cfg, state, mesh_devices: int, step_flops_model: float) -> dict:
    """The tower's cost in the SFT step: params (counted from the config, and found in the sharded state),
    bytes per device, leaves that no mesh axis splits, FLOPs per image / step and its share of the step's model
    FLOPs (step_flops_model: the whole step's, per device, tower included)."""
    import jax

    v = cfg.model.vision
    tower = state.params["vision"]
    leaves = jax.tree_util.tree_flatten_with_path(tower)[0]
    replicated = [(jax.tree_util.keystr(path), list(x.shape), math.prod(x.shape) * x.dtype.itemsize)
                  for path, x in leaves if x.sharding.shard_shape(x.shape) == x.shape]
    opt = [x for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
           if any(getattr(k, "key", None) == "vision" for k in path)]
    flops = vision_flops_per_image(cfg.model)
    images = cfg.train.global_batch_size * v.max_images  # every slot runs through the tower (static shapes)
    per_device = flops["train"] * images / mesh_devices
    return {"params": vision_param_count(cfg.model), "params_in_state": sum(math.prod(x.shape) for _, x in leaves),
            "params_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for _, x in leaves),
            "params_bytes_per_device": per_device_bytes(tower), "optimizer_bytes_per_device": per_device_bytes(opt),
            "replicated": replicated, "replicated_bytes": sum(r[2] for r in replicated),
            "images_per_step": images, "tokens_per_image": v.tokens_per_image, "frozen": v.freeze,
            "flops_forward_per_image": flops["forward"], "flops_train_per_image": flops["train"],
            "flops_per_step": flops["train"] * images, "flops_per_step_per_device": per_device,
            "share_of_step_flops": per_device / step_flops_model if step_flops_model else float("nan")}


# An entry parameter of the compiled (partitioned) program: per-device shape, index, sharding, the batch key it is
#   %param.50 = f32[2,1,224,224,3]{3,2,4,1,0:T(8,128)} parameter(127), sharding={devices=[64,1,1,1,1]<=[64]},
#       metadata={op_name="batch[\'images\']"}
_BATCH_PARAM = re.compile(r"= (\w+)\[([\d,]*)\]\S* parameter\((\d+)\)(?:, sharding=\{([^}]*)\})?.*?"
                          r"op_name=\"batch\[\\'(\w+)\\'\]\"")


def compiled_inputs(compiled, batch: dict) -> dict:
    """The batch entries as the compiled program takes them, read from its entry parameters (the HLO, not what
    we asked for): per-device shape, the pieces its sharding cuts each axis into, bytes per device; beside the
    spec the jit declared. An entry the program never reads is pruned from its parameters: "used" false.
    (The HLO rather than compiled.input_shardings: with hoisted constants that property miscounts its leaves in
    jax 0.10.2, "Too many leaves for PyTreeDef", on the 8B step.)"""
    import jax.numpy as jnp

    found = {m.group(5): m for m in _BATCH_PARAM.finditer(compiled.as_text())}
    out = {}
    for name, x in batch.items():
        spec = x.sharding.spec
        entry = {"shape": list(x.shape), "dtype": str(x.dtype), "used": name in found, "spec": str(spec),
                 "spec_axes": [list(a) if isinstance(a, tuple) else a for a in spec]}
        if name in found:
            dtype, dims, index, sharding = found[name].group(1, 2, 3, 4)
            local = [int(d) for d in dims.split(",") if d]
            tiles = re.match(r"devices=\[([\d,]+)\]", sharding or "")
            entry.update(parameter=int(index), per_device_shape=local, hlo_sharding=sharding or "replicated",
                         pieces=[int(t) for t in tiles.group(1).split(",")][:len(local)] if tiles else [1] * len(local),
                         bytes_per_device=math.prod(local) * jnp.dtype(x.dtype).itemsize, hlo_dtype=dtype)
        else:
            entry.update(bytes_per_device=0)
        out[name] = entry
    return out


def plan_sft(cfg, devices) -> dict:
    """The LM train step; with model.vision on, its batch carries images and the tower's cost is reported."""
    from instruct_jax.train.lm.build import build_lm

    setup = build_lm(cfg, devices)
    state = setup.abstract_state
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    model, hardware = train_flops(cfg.model, cfg.train.seq_len, tokens, len(devices))
    v = cfg.model.vision
    tower = vision_flops_per_image(cfg.model)["train"] * cfg.train.global_batch_size * v.max_images / len(devices)
    batch = lm_batch(cfg, setup.mesh, setup.rules)
    piece, compiled = compile_piece("train_step", setup.train_step, (state, batch), (model + tower, hardware + tower))
    extra = {}
    if v.enabled:
        extra["vision"] = vision_report(cfg, state, len(devices), piece.flops_model)
        extra["inputs"] = compiled_inputs(compiled, batch)
    return phase_result("sft", [piece], params=per_device_bytes(state.params), optimizer=per_device_bytes(
        state.opt_state), tokens=tokens, **extra)


def plan_rm(cfg, devices) -> dict:
    from instruct_jax.train.rm.trainer import build_rm

    setup = build_rm(cfg, devices)  # the reward trainer's own builder: the same step, guards and all
    state = setup.abstract_state
    tokens = cfg.train.global_batch_size * ranking_slots(cfg) * cfg.train.seq_len
    flops = train_flops(cfg.model, cfg.train.seq_len, tokens, len(devices), output_size=1)
    piece, _ = compile_piece("train_step", setup.train_step, (state, ranking_batch(cfg, setup.mesh, setup.rules)),
                             flops)
    return phase_result("rm", [piece], params=per_device_bytes(state.params),
                        optimizer=per_device_bytes(state.opt_state), tokens=tokens)


def plan_dpo(cfg, devices) -> dict:
    from instruct_jax.train.dpo.trainer import build_dpo

    setup = build_dpo(cfg, devices)  # the DPO trainer's own builder
    state = setup.abstract_state
    tokens = cfg.train.global_batch_size * ranking_slots(cfg) * cfg.train.seq_len
    model, hardware = train_flops(cfg.model, cfg.train.seq_len, tokens, len(devices))
    flops = (model * 4 / 3, hardware + model / 3)  # + the reference's forward (a third of forward + backward)
    batch = ranking_batch(cfg, setup.mesh, setup.rules)
    batch["targets"], batch["loss_mask"] = batch["tokens"], batch["tokens"]  # [B, K, T], same sharding
    piece, _ = compile_piece("train_step", setup.train_step, (state, state.params, batch), flops)
    return phase_result("dpo", [piece], params=per_device_bytes(state.params),
                        optimizer=per_device_bytes(state.opt_state), tokens=tokens,
                        reference=per_device_bytes(state.params))


def ppo_flops(cfg, num_devices: int) -> dict[str, tuple[float, float]]:
    """(model, hardware) FLOPs per device of sampling, scoring and updating one rollout batch (rloo / grpo: no value
    model to run or train)."""
    from instruct_jax.metrics import model_flops_per_token
    from instruct_jax.rl.ppo.step import has_critic
    from instruct_jax.rl.ppo.trainer import prompt_len

    m, p, b = cfg.model, cfg.ppo, cfg.train.global_batch_size
    seq = prompt_len(cfg) + p.response_len + 1
    fwd_lm = model_flops_per_token(m, seq) / 3  # forward only: a third of forward + backward
    fwd_rm = model_flops_per_token(m, seq, output_size=1) / 3
    # sampling: prefill the prompt, then one token at a time against the cache (~ a forward pass per token)
    sample = fwd_lm * b * (prompt_len(cfg) + p.response_len) / num_devices
    critic = has_critic(p)
    # policy, reference, value (ppo only) and reward forwards
    experience = (2 * fwd_lm + (2 if critic else 1) * fwd_rm) * b * seq / num_devices
    policy = train_flops(m, seq, p.epochs * b * seq, num_devices)
    value = train_flops(m, seq, p.epochs * b * seq, num_devices, output_size=1) if critic else (0.0, 0.0)
    update = [policy[0] + value[0], policy[1] + value[1]]
    if p.ptx_coef > 0:
        ptx = train_flops(m, cfg.train.seq_len, p.epochs * p.minibatches * p.ptx_batch_size * cfg.train.seq_len,
                          num_devices)
        update = [update[0] + ptx[0], update[1] + ptx[1]]
    return {"sample": (sample, sample), "experience": (experience, experience), "update": tuple(update)}


def ppo_config(cfg):
    """The experiment as PPO reads it: a reward model and the four-model rollout (placeholders for paths)."""
    return dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, reward="model",
                                                           reward_model=cfg.ppo.reward_model or "(plan)"))


def plan_ppo(cfg, devices, tokens: Optional[dict] = None) -> dict:
    """tokens: {"stop_tokens", "pad_id", "eot_id"} of the run's tokenizer, which plan does not load (a pod
    experiment may name a Hub tokenizer); default: one stop token, the last id, which compiles the same
    program up to those constants."""
    import functools

    import jax
    import jax.numpy as jnp

    from instruct_jax.model.heads import RewardModel, init_reward_params_boxed
    from instruct_jax.model.transformer import ModelInput
    from instruct_jax.parallel.mesh import make_mesh
    from instruct_jax.parallel.sharding import logical_to_spec, param_shardings_for, replicated
    from instruct_jax.model.lora import base_is_reference
    from instruct_jax.rl.ppo.step import PTX_KEYS, value_params_of
    from instruct_jax.rl.ppo.trainer import build_ppo, prompt_len
    from instruct_jax.rl.rewards import reward_model_reward

    cfg = ppo_config(cfg)
    mesh, rules = make_mesh(cfg.mesh, devices), cfg.mesh.logical_rules()
    # The reward model: the value model's shape (trunk + scalar head) plus its normalization scalars.
    reward_params, _ = param_shardings_for(
        functools.partial(init_reward_params_boxed, RewardModel(cfg.model)), mesh, rules)
    scalar = abstract((), jnp.float32, replicated(mesh))
    reward = {"params": reward_params, "norm": {"gain": scalar, "bias": scalar}}
    vocab = cfg.model.vocab_size
    tokens = tokens or {"stop_tokens": (vocab - 1,), "pad_id": 0, "eot_id": vocab - 1}
    setup = build_ppo(cfg, **tokens,
                      reward_fn=reward_model_reward(cfg.model),
                      reward_shardings=jax.tree.map(lambda x: x.sharding, reward), devices=devices)
    state = setup.abstract_state
    policy, value, ema = state.policy.params, value_params_of(state), state.ema
    b, t = cfg.train.global_batch_size, prompt_len(cfg)
    rows_2d = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    prompt = ModelInput(*(abstract((b, t), jnp.int32, rows_2d) for _ in range(3)))
    rng = abstract((2,), jnp.uint32, replicated(mesh))

    reference = {} if base_is_reference(cfg.model) else policy  # LoRA: the policy's frozen base is the reference
    sizes = {"policy": per_device_bytes(policy), "value": per_device_bytes(value),
             "reference": per_device_bytes(reference), "reward": per_device_bytes(reward), "ema": per_device_bytes(ema),
             "policy_opt": per_device_bytes(state.policy.opt_state),
             "value_opt": per_device_bytes(state.value.opt_state if value else {})}
    resident = sum(sizes.values())
    flops = ppo_flops(cfg, len(devices))
    # The reference's params are a separate copy of the policy's shape (the update donates the policy).
    sample, compiled = compile_piece("sample", setup.steps.sample, (policy, prompt, rng), flops["sample"],
                                     resident - sizes["policy"])
    sampled = out_structs(compiled)
    kl = abstract((), jnp.float32, replicated(mesh))
    experience, compiled = compile_piece(
        "experience", setup.steps.experience, (policy, reference, value, reward, prompt, sampled, kl),
        flops["experience"], resident - sizes["policy"] - sizes["reference"] - sizes["value"] - sizes["reward"])
    exp = out_structs(compiled)[0]
    args = [state, exp, rng]
    if cfg.ppo.ptx_coef > 0:  # one ptx slice per minibatch step: [E * M * P, T]
        rows = cfg.ppo.ptx_batch_size * cfg.ppo.epochs * cfg.ppo.minibatches
        batch = lm_batch(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=rows)),
                         mesh, rules, images=False)
        args.append({k: batch[k] for k in PTX_KEYS})
    update, _ = compile_piece("update", setup.steps.update, args, flops["update"],
                              sizes["reference"] + sizes["reward"])
    return phase_result("ppo", [sample, experience, update], params=sizes["policy"] + sizes["value"]
                        + sizes["reference"] + sizes["reward"] + sizes["ema"],
                        optimizer=sizes["policy_opt"] + sizes["value_opt"], tokens=b * (t + cfg.ppo.response_len),
                        trees=sizes)


def phase_result(phase: str, pieces: list[Piece], *, params: int, optimizer: int, tokens: int, **extra) -> dict:
    return {"phase": phase, "params_bytes": params, "optimizer_bytes": optimizer, "tokens": tokens,
            "pieces": [dict(dataclasses.asdict(p), total=p.total) for p in pieces], **extra}


PLANNERS = {"sft": plan_sft, "rm": plan_rm, "ppo": plan_ppo, "dpo": plan_dpo}  # PHASES by default; dpo on request
# Phases whose builders feed images to the model (ModelInput.images). The reward-model, DPO and PPO steps take
# none yet, so a vision experiment plans its SFT step alone and says so for the others.
IMAGE_PHASES = ("sft",)


def plan(cfg, topology: str, slices: int = 1, phases: Sequence[str] = PHASES) -> dict:
    """Compile each phase's steps for the topology; a JSON-able dict of per-device numbers."""
    topo = load_topology(topology, slices)
    devices = list(topo.devices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"no HBM / peak FLOPs on record for device kind {kind!r}; known: {sorted(CHIPS)}")
    chip, per_chip = CHIPS[kind], devices_per_chip(topology, len(devices), slices)
    result = {"experiment": cfg.name, "topology": topology, "slices": slices, "devices": len(devices),
              "chip": chip.name, "devices_per_chip": per_chip, "hbm_bytes_per_device": chip.hbm_bytes // per_chip,
              "peak_flops_per_device": chip.peak_flops / per_chip,
              "ici_bytes_per_s_per_device": chip.ici_bytes_per_s / per_chip,
              "dcn_bytes_per_s_per_device": chip.dcn_bytes_per_s / per_chip if chip.dcn_bytes_per_s else None,
              "mesh": mesh_sizes(cfg, len(devices), slices),
              "model": dataclasses.asdict(cfg.model), "phases": []}
    for phase in phases:
        if cfg.model.vision.enabled and phase not in IMAGE_PHASES:
            result["phases"].append({"phase": phase, "pieces": [], "skipped": (
                f"model.vision is on and the {phase} builder takes no images yet (issue 29); only "
                f"{', '.join(IMAGE_PHASES)} is planned with images")})
            continue
        try:
            result["phases"].append(PLANNERS[phase](cfg, devices))
        except Exception as e:  # a config the compiler rejects is a plan result too
            message = f"{type(e).__name__}: {e}"[:2000]
            result["phases"].append({"phase": phase, "error": message,
                                     "out_of_memory": "RESOURCE_EXHAUSTED" in message})
    return result


def mesh_sizes(cfg, num_devices: int, slices: int) -> dict[str, int]:
    from instruct_jax.parallel.mesh import resolve_mesh_shape

    return resolve_mesh_shape(cfg.mesh, num_devices, slices)


# ----------------------------------------------------------------------------- report
def gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def floors(p: dict, result: dict) -> dict:
    """Lower bounds on a step's time per device: FLOPs at peak, ICI bytes and DCN bytes at their links' bandwidth.

    A ring collective receives and sends its bytes, so a device's bidirectional ICI bandwidth moves
    bytes at half its rate. The bound assumes perfect overlap (time >= the largest floor) and ignores HBM
    bandwidth, which bounds decoding more than any of the three. mfu_bound = model FLOPs / peak / bound."""
    flops_s = p["flops_hardware"] / result["peak_flops_per_device"]
    ici_s = p.get("ici_bytes", 0.0) / (result.get("ici_bytes_per_s_per_device") or float("inf")) * 2
    dcn_bw = result.get("dcn_bytes_per_s_per_device")
    dcn_s = p.get("dcn_bytes", 0.0) / dcn_bw if dcn_bw else 0.0
    bound = max(flops_s, ici_s, dcn_s)
    return {"flops_s": flops_s, "ici_s": ici_s, "dcn_s": dcn_s, "bound_s": bound,
            "mfu_bound": p["flops_model"] / result["peak_flops_per_device"] / bound if bound else float("nan")}


def report(result: dict) -> str:
    """The human-readable plan: one table per phase, then a verdict per compiled step and the loops' collectives."""
    hbm, peak = result["hbm_bytes_per_device"], result["peak_flops_per_device"]
    unit = "chip" if result["devices_per_chip"] == 1 else f"device (1/{result['devices_per_chip']} chip)"
    dcn_bw = result.get("dcn_bytes_per_s_per_device")
    lines = [f"plan: {result['experiment']} on {result['topology']} x {result['slices']} slice(s) = "
             f"{result['devices']} devices ({result['chip']}); mesh {result['mesh']}",
             f"per {unit}: HBM {hbm / GIB:.2f} GiB, peak {peak / 1e12:.1f} TFLOP/s (bf16), ICI "
             f"{result.get('ici_bytes_per_s_per_device', 0) / 1e9:.0f} GB/s (bidirectional), DCN "
             + (f"{dcn_bw / 1e9:.2f} GB/s" if dcn_bw else "bandwidth not published (its floor is left out)")]
    for ph in result["phases"]:
        lines.append("")
        if ph.get("out_of_memory"):  # the TPU compiler refuses programs that exceed HBM
            lines.append(f"[{ph['phase']}] DOES NOT FIT: the TPU compiler ran out of HBM: {ph['error']}")
            lines.append("    to change: " + ACTIVATION_ADVICE)
            continue
        if "error" in ph:
            lines.append(f"[{ph['phase']}] did not compile: {ph['error']}")
            continue
        if "skipped" in ph:
            lines.append(f"[{ph['phase']}] not planned: {ph['skipped']}")
            continue
        lines.append(f"[{ph['phase']}] params {ph['params_bytes'] / GIB:.2f} GiB, optimizer state "
                     f"{ph['optimizer_bytes'] / GIB:.2f} GiB per {unit.split(' ')[0]}")
        lines.append(f"  {'step':<11}{'args GiB':>10}{'out GiB':>9}{'alias GiB':>10}{'temp GiB':>9}"
                     f"{'resident*':>10}{'total GiB':>10}{'of HBM':>8}{'TFLOP model':>12}{'TFLOP hw':>10}"
                     f"{'TFLOP xla*':>11}{'ICI GB':>9}{'DCN GB':>9}{'s FLOPs':>9}{'s ICI':>8}{'s DCN':>8}"
                     f"{'MFU<=':>6}{'compile s':>10}")
        for p in ph["pieces"]:
            f = floors(p, result)
            lines.append(f"  {p['name']:<11}{gib(p['argument']):>10}{gib(p['output']):>9}{gib(p['alias']):>10}"
                         f"{gib(p['temp']):>9}{gib(p['resident_elsewhere']):>10}{gib(p['total']):>10}"
                         f"{p['total'] / hbm:>7.0%} {p['flops_model'] / 1e12:>11.2f}{p['flops_hardware'] / 1e12:>10.2f}"
                         f"{p['flops_compiler'] / 1e12:>11.2f}{p.get('ici_bytes', 0) / 1e9:>9.2f}"
                         f"{p.get('dcn_bytes', 0) / 1e9:>9.2f}{f['flops_s']:>9.3f}{f['ici_s']:>8.3f}{f['dcn_s']:>8.3f}"
                         f"{f['mfu_bound']:>6.0%}{p['compile_s']:>10.1f}")
        lines.extend(verdicts(ph, hbm))
        if "vision" in ph:
            lines.extend(vision_lines(ph, unit.split(" ")[0]))
        for p in ph["pieces"]:
            lines.extend(loop_lines(p))
    lines.append("")
    lines.append("* resident: trees on the chip that the step does not take as arguments (frozen models, optimizer "
                 "states while sampling). TFLOP per device and step; hw = model + remat recompute; xla: the "
                 "compiler's cost_analysis, which counts each loop body (scanned layers, microbatches, decode "
                 "steps) once. ICI / DCN GB: collective bytes per device per step, read from the compiled program "
                 "(loop bodies times their trip counts; a decode loop at its bound). s FLOPs / ICI / DCN: each at "
                 "the chip's peak or link bandwidth; MFU<=: model FLOPs at peak over the largest of the three, an "
                 "upper bound that assumes perfect overlap and ignores HBM bandwidth.")
    return "\n".join(lines)


def vision_lines(ph: dict, unit: str) -> list[str]:
    """The vision tower's share of the step: params and bytes, FLOPs per image and per step, the images input."""
    v = ph["vision"]
    out = [f"  vision tower: {v['params'] / 1e6:.1f}M params (tower + projector; {v['params_in_state'] / 1e6:.1f}M in "
           f"the sharded state), {v['params_bytes_per_device'] / 2 ** 20:.1f} MiB params + "
           f"{v['optimizer_bytes_per_device'] / 2 ** 20:.1f} MiB optimizer state per {unit}"
           + (" (frozen)" if v["frozen"] else ""),
           f"    {v['tokens_per_image']} tokens per image; {v['flops_forward_per_image'] / 1e9:.4g} GFLOP forward, "
           f"{v['flops_train_per_image'] / 1e9:.4g} GFLOP forward + backward per image; {v['images_per_step']} "
           f"images per step: {v['flops_per_step'] / 1e12:.4g} TFLOP per step, "
           f"{v['flops_per_step_per_device'] / 1e12:.4g} per {unit}, {v['share_of_step_flops']:.2%} of the step's "
           f"model FLOPs"]
    if v["replicated"]:
        out.append(f"    replicated on every {unit} (no mesh axis splits them): {len(v['replicated'])} leaves, "
                   f"{v['replicated_bytes'] / 2 ** 20:.2f} MiB; largest "
                   + ", ".join(f"{name} {shape}" for name, shape, _ in sorted(v["replicated"], key=lambda r: -r[2])[:3]))
    images = ph.get("inputs", {}).get("images")
    if images and images["used"]:
        out.append(f"    images input {images['shape']} {images['dtype']} ({images['spec']}): parameter "
                   f"{images['parameter']} of the compiled program, {images['per_device_shape']} per {unit} "
                   f"({images['bytes_per_device'] / 2 ** 20:.2f} MiB), sharding {{{images['hlo_sharding']}}}")
    elif images:
        out.append("    images input: NOT among the compiled program's parameters (the step never reads it)")
    return out


def loop_lines(p: dict, top: int = 8) -> list[str]:
    """The step's largest collectives inside loops, grouped by loop, op and shape."""
    groups: dict[tuple, list] = {}
    for c in p.get("loop_collectives", []):
        key = (c["loop"], c["op"], c["shape"], c["group"], c["dcn"], c["invariant"])
        groups.setdefault(key, [0, 0.0])
        groups[key][0] += 1
        groups[key][1] += c["bytes_per_step"]
    if not groups:
        return []
    out = [f"  {p['name']}: collectives inside loops (per device; loop x trips):"]
    if p.get("attention_heads"):
        out.insert(0, f"  {p['name']}: attention (Splash) on {', '.join(map(str, p['attention_heads']))} query "
                      f"heads per device")
    for (loop, op, shape, n, dcn, invariant), (count, total) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        note = "  (a loop-invariant operand: a weight or a slice of one)" if invariant else ""
        out.append(f"    {loop}: {count} x {op} {shape} over {n} ({'DCN' if dcn else 'ICI'}), "
                   f"{total / 1e9:.3f} GB/step{note}")
    if len(groups) > top:
        out.append(f"    ... {len(groups) - top} more groups in the JSON (pieces[].loop_collectives)")
    return out


def verdicts(ph: dict, hbm: int) -> list[str]:
    """'fits' or 'DOES NOT FIT' per step, naming the biggest buffers, the overflow and what to change."""
    out = []
    for p in ph["pieces"]:
        if p["total"] <= hbm:
            out.append(f"  {p['name']}: fits, {(hbm - p['total']) / GIB:.2f} GiB to spare")
            continue
        parts = {"temporaries (activations, gradients, collective buffers)": p["temp"],
                 "params": ph["params_bytes"], "optimizer state": ph["optimizer_bytes"],
                 "other inputs/outputs": max(p["argument"] + p["output"] - p["alias"] + p["resident_elsewhere"]
                                             - ph["params_bytes"] - ph["optimizer_bytes"], 0)}
        biggest = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        out.append(f"  {p['name']}: DOES NOT FIT: needs {p['total'] / GIB:.2f} GiB, HBM {hbm / GIB:.2f} GiB, over by "
                   f"{(p['total'] - hbm) / GIB:.2f} GiB. Largest: {biggest}.")
        out.append("    to change: " + advice(p, ph, hbm))
    return out


ACTIVATION_ADVICE = ("temporaries dominate: model.remat=full (save only each layer's input), more train.microbatches "
                     "(same global batch, fewer rows live at once), a smaller per-device batch, shard activations "
                     "further (a larger mesh.tensor or mesh.sequence axis), and no replicated large weight (a "
                     "gathered, unsharded table costs its full size on every device)")


def advice(p: dict, ph: dict, hbm: int) -> str:
    state = ph["params_bytes"] + ph["optimizer_bytes"]
    if p["temp"] >= state:
        return ACTIVATION_ADVICE
    return ("parameters / optimizer state dominate: shard them over more devices (a larger mesh.fsdp; "
            "params shard over fsdp x tensor), optim.mu_dtype=bfloat16, or a larger slice / more slices")


# ----------------------------------------------------------------------------- subprocess entry points
def run_in_subprocess(experiment: str, topology: str, slices: int = 1, phases: Sequence[str] = PHASES,
                      overrides: Sequence[str] = (), timeout: Optional[float] = None) -> dict:
    """Plan in a fresh `python -m instruct_jax.plan` with JAX_PLATFORMS=cpu; returns the result dict.

    The child prints the report on stderr (streamed through) and the JSON on stdout."""
    require_libtpu()
    cmd = [sys.executable, "-m", "instruct_jax.plan", "--experiment", experiment, "--topology", topology,
           "--slices", str(slices), "--phases", ",".join(phases), "--json", "-"]
    if overrides:
        cmd += ["--set", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           # libtpu asks the (absent) TPU metadata server where it runs; these answers skip that look-up.
           "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": os.environ.get("TPU_ACCELERATOR_TYPE", "v5p-8"),
           "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
    env.pop("XLA_FLAGS", None)  # the caller's emulated CPU devices are not the plan's business
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise PlanError(f"plan subprocess failed with exit code {proc.returncode} (its error is printed above)")
    return json.loads(proc.stdout)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instruct_jax plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", default=None, help="write the result as JSON to this file ('-': stdout)")
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, metavar="FILE[:ARG]")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:8x8x8, v4:16x16x12, v5e:2x2")
    p.add_argument("--slices", type=int, default=1, help="slices of that topology joined over DCN")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of sft,rm,ppo,dpo "
                   "(default sft,rm,ppo)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")


def main(argv: Optional[list[str]] = None) -> int:
    """The subprocess side: load, plan, print the report (stderr) and the JSON (--json)."""
    args = _parser().parse_args(argv)
    from instruct_jax.config import apply_overrides, load_experiment
    from instruct_jax.errors import ConfigError

    try:
        phases = parse_phases(args.phases)
        cfg = apply_overrides(load_experiment(args.experiment), args.overrides)
        result = plan(cfg, args.topology, args.slices, phases)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result), file=sys.stderr, flush=True)
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def parse_phases(text: str) -> tuple[str, ...]:
    from instruct_jax.errors import ConfigError

    phases = tuple(p for p in text.split(",") if p)
    bad = [p for p in phases if p not in PLANNERS]
    if bad or not phases:
        raise ConfigError("--phases", f"expected a comma-separated subset of {list(PLANNERS)}, got {text!r}")
    return phases


def cli(args) -> int:
    """`python -m instruct_jax plan ...`: the plan runs in a subprocess; print its report, keep its JSON."""
    from instruct_jax.errors import ConfigError

    try:
        result = run_in_subprocess(args.experiment, args.topology, args.slices, parse_phases(args.phases),
                                   args.overrides)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
