"""Every attention implementation against the einsum reference: outputs and gradients.

Cases: causal single sequences, packed segments with padding, grouped-query heads, and
lengths that are not multiples of the block size. Rows that see no key at all (padding
tokens) are "don't care" (blockwise returns 0 there, the reference a uniform average) and
never reach a loss, so outputs are compared on visible rows and the loss cotangent is zero
on the others.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.errors import ConfigError
from instruct_jax.model.attention.blockwise import blockwise_attention
from instruct_jax.model.attention.dispatch import dot_product_attention, select_implementation
from instruct_jax.model.attention.fused import right_padded_lengths, splash_attention
from instruct_jax.model.attention.masks import attention_mask, reference_attention
from instruct_jax.model.attention.ring import _zigzag_dest, ring_attention
from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.mesh import MeshConfig, make_mesh


def rows(kind: str, b: int, t: int):
    """(positions, segment_ids) [B, T]: 'causal' one full sequence per row; 'packed' two
    examples, a third one cut short, then padding; plus a right-padded row."""
    pos, seg = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for r in range(b):
        if kind == "causal":
            pos[r], seg[r] = np.arange(t), 1
            continue
        cuts = [0, t // 3 + r, (2 * t) // 3, t - 3] if r % 2 == 0 else [0, t - 5]
        for i, (a, z) in enumerate(zip(cuts[:-1], cuts[1:])):
            pos[r, a:z], seg[r, a:z] = np.arange(z - a), i + 1
    return jnp.asarray(pos), jnp.asarray(seg)


def problem(kind: str, t: int, heads=4, kv_heads=2, b=2, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32)
    pos, seg = rows(kind, b, t)
    visible = attention_mask(pos, pos, seg, seg).any(-1)[:, :, None, None]  # [B, T, 1, 1]
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * visible
    return (q, k, v), pos, seg, visible, cotangent


def assert_matches_reference(attend, kind, t, heads=4, kv_heads=2, jit=jax.jit):
    """attend(q, k, v, pos, seg) against reference_attention: outputs on visible rows and (dq, dk, dv)."""
    qkv, pos, seg, visible, cotangent = problem(kind, t, heads, kv_heads)

    def reference(q, k, v):
        return reference_attention(q, k, v, attention_mask(pos, pos, seg, seg))

    def value_and_grads(fn):  # one compiled function: output and (dq, dk, dv) for the cotangent
        out, pullback = jax.vjp(fn, *qkv)
        return out, pullback(cotangent)

    want, want_grads = jax.jit(lambda: value_and_grads(reference))()
    got, got_grads = jit(lambda: value_and_grads(lambda *a: attend(*a, pos, seg)))()
    np.testing.assert_allclose(got * visible, want * visible, atol=2e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


CASES = [("causal", 37, 4, 4), ("packed", 40, 4, 1)]  # T=37, 40: not multiples of 16; 40 is 4 kv groups of 1


@pytest.mark.parametrize("kind,t,heads,kv_heads", CASES)
def test_blockwise_matches_reference(kind, t, heads, kv_heads):
    def attend(q, k, v, pos, seg):
        return blockwise_attention(q, k, v, pos, pos, seg, seg, block_q=8, block_kv=16)

    assert_matches_reference(attend, kind, t, heads, kv_heads)


@pytest.mark.parametrize("mesh,kind,t", [
    (MeshConfig(fsdp=1, sequence=8), "packed", 64),  # 8 per device: zigzag halves of 4
    (MeshConfig(fsdp=1, sequence=8), "causal", 40),  # 5 per device: odd, so contiguous (no zigzag)
    (MeshConfig(fsdp=2, sequence=2, tensor=2), "packed", 36),  # batch, sequence and heads all split
])
def test_ring_matches_reference_on_8_devices(mesh, kind, t):
    def attend(q, k, v, pos, seg):
        return ring_attention(q, k, v, pos, pos, seg, seg, block_q=4, block_kv=4)

    with mesh_and_rules(make_mesh(mesh, jax.devices()), mesh.logical_rules()):
        assert_matches_reference(attend, kind, t)


def test_zigzag_layout_balances_causal_work():
    """Device i holds halves (i, 2P-1-i); every (device, ring step) pair then attends the same
    number of causal (query, key) pairs, where contiguous chunks leave device 0 idle."""
    size, half = 4, 8
    to_zig, back = _zigzag_dest(size, False), _zigzag_dest(size, True)
    for d in range(size):
        for h in (0, 1):
            assert back(*to_zig(d, h)) == (d, h)
    holds = {to_zig(d, h): 2 * d + h for d in range(size) for h in (0, 1)}  # (device, slot) -> global half
    assert [(holds[(d, 0)], holds[(d, 1)]) for d in range(size)] == [(0, 7), (1, 6), (2, 5), (3, 4)]

    def tokens(device, zigzag):
        halves = (holds[(device, 0)], holds[(device, 1)]) if zigzag else (2 * device, 2 * device + 1)
        return np.concatenate([np.arange(j * half, (j + 1) * half) for j in halves])

    def work(zigzag):  # [device, step]: visible pairs when device d holds the kv of device d - step
        return np.array([[np.sum(tokens((d - s) % size, zigzag)[None, :] <= tokens(d, zigzag)[:, None])
                          for s in range(size)] for d in range(size)])

    balanced, contiguous = work(True), work(False)
    assert balanced.sum() == contiguous.sum()
    assert np.all(balanced[:, 1:] == 2 * half * half)  # two full half-blocks at every later step
    assert balanced[:, 0].max() - balanced[:, 0].min() == 0
    assert contiguous[0, 1:].sum() == 0 and contiguous[-1, 1:].min() == (2 * half) ** 2


@pytest.mark.slow
def test_splash_kernel_matches_reference_in_interpreter():
    """The TPU kernel's logic, run by the Pallas interpreter on CPU (one 128-token tile, GQA, packed)."""
    qkv, pos, seg, visible, _ = problem("packed", 100)
    got = splash_attention(*qkv, seg, seg, block=128, interpret=True)
    want = reference_attention(*qkv, attention_mask(pos, pos, seg, seg))
    np.testing.assert_allclose(got * visible, want * visible, atol=1e-5)


def test_right_padded_lengths_detects_packing():
    seg = jnp.array([[1, 1, 1, 0], [1, 1, 2, 2], [0, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 0], [0, 1, 0, 1], [0, 0, 1, 2]])
    lengths, ok = right_padded_lengths(pos, seg)
    assert lengths.tolist() == [3, 4, 3] and not bool(ok)
    lengths, ok = right_padded_lengths(pos[:1], seg[:1])
    assert lengths.tolist() == [3] and bool(ok)


def test_auto_selection():
    pick = lambda requested, **kw: select_implementation(  # noqa: E731
        requested, **{"q_len": 8192, "self_attention": True, "backend": "cpu", "sequence_shards": 1,
                      "dtype": jnp.float32, **kw})
    assert pick("auto") == "blockwise"
    assert pick("auto", q_len=512) == "reference"
    assert pick("auto", sequence_shards=8) == "ring"
    assert pick("auto", sequence_shards=3) == "blockwise"  # 8192 does not split 3 ways
    assert pick("auto", backend="tpu") == "splash"
    assert pick("auto", backend="gpu", dtype=jnp.bfloat16) == "cudnn"
    assert pick("auto", backend="gpu") == "blockwise"  # cuDNN flash attention is 16-bit only
    assert pick("ring") == "blockwise"  # no sequence axis to ring over
    assert pick("blockwise", q_len=4) == "blockwise"
    # Decoding from a KV cache: a 1-token step stays on the reference, a long prefill goes blockwise.
    assert pick("ring", self_attention=False, q_len=1, sequence_shards=8) == "reference"
    assert pick("auto", self_attention=False, q_len=4096) == "blockwise"
    with pytest.raises(ConfigError, match="model.attention.*TPU only"):
        pick("splash")
    with pytest.raises(ConfigError, match="model.attention.*16-bit"):
        pick("cudnn", backend="gpu")


def test_dispatch_runs_the_selected_kernel():
    (q, k, v), pos, seg, visible, _ = problem("packed", 24)
    want = reference_attention(q, k, v, attention_mask(pos, pos, seg, seg)) * visible
    for impl in ("reference", "blockwise", "auto"):
        got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, pos, pos, seg, seg, implementation=impl,
                                                            block_q=8, block_kv=8))(q, k, v)
        np.testing.assert_allclose(got * visible, want, atol=2e-6, err_msg=impl)
