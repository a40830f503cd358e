"""The hot loops on real TPU topologies, read from what libtpu's compiler makes of them (issue 27, items 3-4).

Small scanned models (two layers compile to the same per-layer program as eighty) with multi-query and
grouped-query attention, compiled by the TPU compiler for v5p:2x2x2 (2 hosts), v5p:4x4x4 (16 hosts) and two
v5p:2x2x2 slices, through `plan.compile_piece` (the plan's own reader, parallel/collectives.py):

* the decode loop gathers no weight (nor a slice of one): the weights move to the inference layout once per
  call (`ppo.rollout_weights=gathered`); the training layout, compiled alongside, does gather them per token;
* the loss-chunk loop carries no collective the size of the vocabulary (no [V, D] kernel or gradient);
* Splash attention runs on heads / tensor query heads per device for MQA and GQA (from the kernel's shapes);
* the plan's JSON and report carry the collective bytes (ICI, and DCN across slices).
Runs in a subprocess: libtpu needs its own environment and must not meet the tests' emulated CPU devices.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) missing")

SCRIPT = r"""
import dataclasses, json, re, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies

from instruct_jax import plan
from instruct_jax.config import Config, TrainConfig
from instruct_jax.inference.sampling import SamplingConfig, make_sampler
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.parallel.sharding import logical_to_spec, replicated
from instruct_jax.train.lm.build import build_lm

VOCAB = 1536  # 1536 / tensor 4 = 384 rows per device: a size no activation of these models has
TOPOLOGIES = [("v5p:2x2x2", 1), ("v5p:4x4x4", 1), ("v5p:2x2x2", 2)]
ATTENTION = {"mqa": 1, "gqa": 2}  # kv heads, for 8 query heads over tensor 4
out = []
for name, slices in TOPOLOGIES:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                        **({"num_slices": slices} if slices > 1 else {}))
    devices = list(topo.devices)
    for kind, kv in ATTENTION.items():
        model = ModelConfig(d_model=256, num_heads=8, num_kv_heads=kv, head_dim=128, mlp_dim=512, vocab_size=VOCAB,
                            num_layers=2, dtype="bfloat16", remat="full", attention="splash", loss_chunk=32)
        mesh_cfg = MeshConfig(fsdp=-1, tensor=4, dcn_data=slices,
                              rules=(("kv_heads", None), ("act_kv_heads", None), ("cache_kv_heads", None)))
        cfg = Config(name=f"{kind}", model=model, mesh=mesh_cfg,
                     train=TrainConfig(seq_len=128, global_batch_size=2 * len(devices) // 4))
        setup = build_lm(cfg, devices)
        batch = plan.lm_batch(cfg, setup.mesh, setup.rules)
        sft, _ = plan.compile_piece("train_step", setup.train_step, (setup.abstract_state, batch), (1.0, 1.0))
        rows = jax.sharding.NamedSharding(setup.mesh, logical_to_spec(("batch", None), setup.rules))
        b = cfg.train.global_batch_size
        prompt = ModelInput(*(plan.abstract((b, 16), jnp.int32, rows) for _ in range(3)))
        rng = plan.abstract((2,), jnp.uint32, replicated(setup.mesh))
        params = setup.abstract_state.params
        shardings = jax.tree.map(lambda x: x.sharding, params)
        samples = {}
        for weights in ("gathered", "sharded"):
            sampler = make_sampler(Transformer(model), SamplingConfig(max_new_tokens=8, temperature=1.0), setup.mesh,
                                   setup.rules, shardings, weights=weights)
            piece, _ = plan.compile_piece(f"sample_{weights}", sampler.sample, (params, prompt, rng), (1.0, 1.0))
            samples[weights] = dataclasses.asdict(piece)
        out.append({"topology": name, "slices": slices, "attention": kind, "hosts": len({d.process_index for d in devices}),
                    "sft": dataclasses.asdict(sft), "sample": samples})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
           "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
           "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in(loop_collectives, where):
    return [c for c in loop_collectives if where in c["innermost"]]


@pytest.mark.slow
@needs_libtpu
def test_decode_loop_gathers_no_weight_on_tpu_topologies(compiled):
    assert {(c["topology"], c["slices"]) for c in compiled} == {("v5p:2x2x2", 1), ("v5p:4x4x4", 1), ("v5p:2x2x2", 2)}
    for case in compiled:
        label = f"{case['topology']} x{case['slices']} {case['attention']}"
        gathered = _in(case["sample"]["gathered"]["loop_collectives"], "sampling.py:sample")
        weights = [c for c in gathered if c["invariant"] and c["op"] in ("all-gather", "collective-permute")]
        assert not weights, (label, [(c["op"], c["shape"]) for c in weights])
        # the training layout, compiled for the same mesh, re-gathers the fsdp-split weights every token
        sharded = _in(case["sample"]["sharded"]["loop_collectives"], "sampling.py:sample")
        assert any(c["invariant"] and c["op"] == "all-gather" for c in sharded), label
        assert case["sample"]["gathered"]["ici_bytes"] < case["sample"]["sharded"]["ici_bytes"], label


@pytest.mark.slow
@needs_libtpu
def test_loss_chunk_loop_carries_no_vocabulary_sized_collective_on_tpu_topologies(compiled):
    for case in compiled:
        in_loss = _in(case["sft"]["loop_collectives"], "losses.py")
        vocab_sized = [c for c in in_loss if {"1536", "384"} & set(c["shape"].replace("[", ",").replace("]", ",")
                                                                   .split(","))]
        assert not vocab_sized, (case["topology"], case["attention"], [(c["op"], c["shape"]) for c in vocab_sized])
        assert not any(c["invariant"] for c in in_loss)


@pytest.mark.slow
@needs_libtpu
def test_attention_runs_heads_over_tensor_query_heads_per_device_on_tpu_topologies(compiled):
    for case in compiled:
        assert case["sft"]["attention_heads"] == [8 // 4], (case["topology"], case["attention"])


@pytest.mark.slow
@needs_libtpu
def test_collective_bytes_split_into_ici_and_dcn(compiled):
    for case in compiled:
        sft = case["sft"]
        assert sft["ici_bytes"] > 0
        # two slices joined over data: the gradient reduction crosses the DCN; one slice never does
        assert (sft["dcn_bytes"] > 0) == (case["slices"] == 2), (case["topology"], case["slices"], sft["dcn_bytes"])
