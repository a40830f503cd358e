"""Ahead-of-time pod plans (instruct_jax/plan.py): the real TPU compiler on a small topology, in a subprocess.

The slow test plans a tile-friendly tiny model on v5e:2x2 and checks that the printed table is the
compiler's memory_analysis, and that the compiler's argument bytes are the per-device bytes of the
sharded state and batch that plan.py accounts for (up to TPU tile padding)."""

import importlib.util
import re

import pytest

from instruct_jax import plan

GIB = 2 ** 30
# 128-wide minor dimensions so TPU tiles (8 x 128) add almost no padding to the arguments.
EXPERIMENT = """
from instruct_jax.config import Config, TrainConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig


def get_config(arg=None):
    return Config(name="plan-test", model=ModelConfig(d_model=256, num_heads=8, num_kv_heads=8, head_dim=128,
                                                      mlp_dim=512, vocab_size=1024, dtype="bfloat16", remat="full"),
                  mesh=MeshConfig(data=2, fsdp=-1), train=TrainConfig(seq_len=128, global_batch_size=32))
"""

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) missing")


def printed_rows(text: str, phase: str) -> dict[str, list[float]]:
    """The numeric columns of each step row under [phase] in the report."""
    block = text.split(f"[{phase}]", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\s+(train_step|sample|experience|update)\s+([\d.\s%]+)$", line)
        if m:
            rows[m.group(1)] = [float(x.rstrip("%")) for x in m.group(2).split()]
    return rows


@pytest.mark.slow
@needs_libtpu
def test_plan_on_v5e_prints_the_compilers_memory_analysis(capfd, tmp_path):
    (tmp_path / "tiny_plan.py").write_text(EXPERIMENT)
    result = plan.run_in_subprocess(str(tmp_path / "tiny_plan.py"), "v5e:2x2", phases=("sft", "ppo", "dpo"),
                                   timeout=300)
    text = capfd.readouterr().err
    assert result["devices"] == 4 and result["chip"] == "TPU v5e" and result["hbm_bytes_per_device"] == 16 * GIB
    for ph in result["phases"]:
        assert "error" not in ph, ph
        rows = printed_rows(text, ph["phase"])
        assert set(rows) == {p["name"] for p in ph["pieces"]}
        for p in ph["pieces"]:
            args, out, alias, temp, resident, total = rows[p["name"]][:6]
            for printed, exact in ((args, p["argument"]), (out, p["output"]), (alias, p["alias"]),
                                   (temp, p["temp"]), (resident, p["resident_elsewhere"])):
                assert printed == pytest.approx(exact / GIB, abs=0.006)
            assert p["total"] == (p["argument"] + p["output"] - p["alias"] + p["temp"] + p["code"]
                                  + p["resident_elsewhere"])
            assert p["flops_hardware"] >= p["flops_model"] > 0 and p["flops_compiler"] > 0
        assert "fits" in text

    sft = result["phases"][0]["pieces"][0]
    # The train step's arguments are the sharded TrainState and the batch [32, 128] x 5 arrays over 4
    # batch shards: the compiler allocates what plan.py counts, plus layout padding of the small leaves.
    state = result["phases"][0]["params_bytes"] + result["phases"][0]["optimizer_bytes"]
    batch = 5 * (32 // 4) * 128 * 4
    assert state + batch <= sft["argument"] <= 1.05 * (state + batch)
    assert sft["alias"] >= state  # the donated state is updated in place
    dpo = next(ph for ph in result["phases"] if ph["phase"] == "dpo")  # the policy's state and its frozen reference
    assert dpo["pieces"][0]["argument"] >= 2 * dpo["params_bytes"] + dpo["optimizer_bytes"]
    assert dpo["reference"] == dpo["params_bytes"]


def test_does_not_fit_names_the_buffers_the_overflow_and_a_change():
    piece = dict(name="train_step", argument=6 * GIB, output=6 * GIB, alias=6 * GIB, temp=30 * GIB, code=0,
                 resident_elsewhere=0, flops_compiler=1e12, flops_model=1e15, flops_hardware=1.3e15, compile_s=1.0,
                 total=36 * GIB)
    result = {"experiment": "x", "topology": "v4:2x2x1", "slices": 1, "devices": 8, "chip": "TPU v4",
              "devices_per_chip": 2, "hbm_bytes_per_device": 16 * GIB, "peak_flops_per_device": 137.5e12,
              "mesh": {}, "phases": [{"phase": "sft", "params_bytes": 2 * GIB, "optimizer_bytes": 4 * GIB,
                                      "tokens": 1, "pieces": [piece]}]}
    text = plan.report(result)
    assert "DOES NOT FIT: needs 36.00 GiB, HBM 16.00 GiB, over by 20.00 GiB" in text
    assert "Largest: temporaries (activations, gradients, collective buffers) 30.00 GiB" in text
    assert "model.remat=full" in text and "train.microbatches" in text
    assert "77%" in text  # MFU at peak = model / hardware FLOPs


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(plan.PlanError, match=r"pip install -e '\.\[tpu\]'"):
        plan.run_in_subprocess("experiments/none.py", "v5e:2x2")
