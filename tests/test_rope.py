"""Rotary embeddings: frequency tables against hand-computed numbers, the rotation against a naive loop.

Expected tables are written out as literals (worked by hand from the formulas in the comments) or
rebuilt with plain-Python loops here; nothing below calls rope.py's private helpers.
"""

import cmath
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.model.rope import ROPE_TYPES, apply_rope, rope_inv_freq, rope_params

RTOL = 1e-6  # the table is float32


# ----------------------------------------------------------------------------- frequency tables
def test_default_table():
    # head_dim 8, theta 1e4: theta^(-2i/8) = 10^(-i).
    inv, scale = rope_inv_freq(8, 10000.0)
    assert inv.dtype == np.float32 and inv.shape == (4,)
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001], rtol=RTOL)
    assert scale == 1.0
    # A larger table against a plain loop.
    inv, _ = rope_inv_freq(16, 500000.0)
    np.testing.assert_allclose(inv, [500000.0 ** (-2 * i / 16) for i in range(8)], rtol=RTOL)


def test_linear_table():
    inv, scale = rope_inv_freq(8, 10000.0, "linear", factor=4.0)
    np.testing.assert_allclose(inv, [0.25, 0.025, 0.0025, 0.00025], rtol=RTOL)
    assert scale == 1.0


def test_ntk_table():
    # theta' = 1e4 * 4^(8/6), so inv_i = 10^(-i) * 4^(-i/3): [1, 0.1 * 4^(-1/3), 0.01 * 4^(-2/3), 0.001 / 4].
    inv, scale = rope_inv_freq(8, 10000.0, "ntk", factor=4.0)
    np.testing.assert_allclose(inv, [1.0, 0.06299605249474366, 0.003968502629920499, 0.00025], rtol=RTOL)
    assert scale == 1.0
    # The defining property at a real size: the fastest pair is untouched, the slowest divided by factor.
    inv, _ = rope_inv_freq(128, 500000.0, "ntk", factor=8.0)
    plain = [500000.0 ** (-2 * i / 128) for i in range(64)]
    np.testing.assert_allclose([inv[0], inv[-1]], [plain[0], plain[-1] / 8.0], rtol=RTOL)
    new_base = 500000.0 * 8.0 ** (128 / 126)
    np.testing.assert_allclose(inv, [new_base ** (-2 * i / 128) for i in range(64)], rtol=RTOL)


def test_yarn_table():
    # head_dim 8, theta 1e4, factor 4, original context 2048, beta 32 / 1.
    # Pair index turning r times over 2048 positions: 8 * ln(2048 / (2 pi r)) / (2 ln 1e4)
    #   r = 32 -> 1.0080 -> floor 1;  r = 1 -> 2.5132 -> ceil 3.
    # Ramp (i - 1) / (3 - 1) clipped: [0, 0, 0.5, 1]; inv = plain * (1 - ramp) + plain / 4 * ramp.
    inv, scale = rope_inv_freq(8, 10000.0, "yarn", factor=4.0, original_max_len=2048)
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01 * (0.5 + 0.5 / 4), 0.001 / 4], rtol=RTOL)
    # Without the floor/ceil the third entry would use ramp 0.659 instead of 0.5.
    assert abs(inv[2] - 0.00625) < 1e-9
    np.testing.assert_allclose(scale, 1.138629436111989, rtol=1e-12)  # 0.1 ln 4 + 1


def test_yarn_zero_width_ramp():
    # Original context 6: both band edges clamp to pair 0, so the ramp gets transformers' 0.001 width
    # and every pair but the first is fully interpolated.
    inv, _ = rope_inv_freq(8, 10000.0, "yarn", factor=4.0, original_max_len=6)
    np.testing.assert_allclose(inv, [1.0, 0.025, 0.0025, 0.00025], rtol=RTOL)


def test_yarn_attention_scaling():
    _, scale = rope_inv_freq(64, 10000.0, "yarn", factor=16.0, original_max_len=4096)
    np.testing.assert_allclose(scale, 0.1 * math.log(16.0) + 1.0, rtol=1e-12)  # 1.2773
    inv, scale = rope_inv_freq(64, 10000.0, "yarn", factor=1.0, original_max_len=4096)
    assert scale == 1.0
    np.testing.assert_allclose(inv, rope_inv_freq(64, 10000.0)[0], rtol=RTOL)  # nothing to extend
    _, scale = rope_inv_freq(64, 10000.0, "yarn", factor=16.0, attention_factor=1.5)
    assert scale == 1.5


def test_llama3_small_table():
    # head_dim 8, theta 1e4, factor 8, original 1024, low 1, high 4. Wavelengths 2 pi * [1, 10, 100, 1000]
    # = [6.3, 62.8, 628.3, 6283.2]; bands: kept below 1024/4 = 256, divided by 8 above 1024.
    # Pair 2 is in between: smooth = (1024 / 628.3185 - 1) / 3 = 0.209916, inv = 0.01 * ((1 - s) / 8 + s).
    inv, scale = rope_inv_freq(8, 10000.0, "llama3", factor=8.0, original_max_len=1024,
                               low_freq_factor=1.0, high_freq_factor=4.0)
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.003086760967011274, 0.000125], rtol=RTOL)
    assert scale == 1.0


def _meta_llama31_scaling(freqs):
    """Meta's Llama 3.1 `apply_scaling`, as a plain loop over pairs."""
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(freq)
        elif wavelen > 8192 / 1:
            out.append(freq / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - smooth) * freq / 8 + smooth * freq)
    return out


def test_llama31_real_settings():
    inv, scale = rope_inv_freq(128, 500000.0, "llama3", factor=8.0, original_max_len=8192,
                               low_freq_factor=1.0, high_freq_factor=4.0)
    assert inv.shape == (64,) and scale == 1.0
    # Pair i has wavelength 2 pi * 500000^(i/64): kept for i <= 28 (< 2048), divided by 8 for i >= 35 (> 8192).
    explicit = {
        0: 1.0,                                  # kept
        1: 500000.0 ** (-1 / 64),                # kept: 0.81462
        28: 500000.0 ** (-28 / 64),              # kept: 0.0032114 (wavelength 1956.5)
        29: 0.002166570763503359,                # blend, smooth 0.7854 (wavelength 2401.7)
        32: 0.0005248461609929547,               # blend: plain 500000^-0.5 = 0.0014142, smooth 0.28128
        34: 0.0001785078127679964,               # blend, smooth 0.0271 (wavelength 6695.1)
        35: 500000.0 ** (-35 / 64) / 8,          # divided: 9.5562e-05 (wavelength 8218.7)
        63: 500000.0 ** (-63 / 64) / 8,          # divided: 3.0689e-07
    }
    for i, want in explicit.items():
        np.testing.assert_allclose(inv[i], want, rtol=RTOL, err_msg=f"pair {i}")
    plain = [500000.0 ** (-2 * i / 128) for i in range(64)]
    np.testing.assert_allclose(inv, _meta_llama31_scaling(plain), rtol=RTOL)


def test_rope_params_reads_model_config():
    from instruct_jax.model.config import ModelConfig, ROPE_TYPES as CONFIG_ROPE_TYPES

    assert ROPE_TYPES == CONFIG_ROPE_TYPES
    cfg = ModelConfig(head_dim=128, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0)
    inv, scale = rope_params(cfg)
    np.testing.assert_array_equal(inv, rope_inv_freq(128, 500000.0, "llama3", factor=8.0)[0])
    cfg = types.SimpleNamespace(head_dim=8, rope_theta=10000.0, rope_type="yarn", rope_factor=4.0,
                                rope_original_max_len=2048, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                rope_beta_fast=32.0, rope_beta_slow=1.0)
    inv, scale = rope_params(cfg)
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.00625, 0.00025], rtol=RTOL)
    np.testing.assert_allclose(scale, 1.138629436111989)


@pytest.mark.parametrize("kwargs", [
    dict(head_dim=7, theta=1e4), dict(head_dim=8, theta=1e4, rope_type="rotary"),
    dict(head_dim=8, theta=0.0), dict(head_dim=8, theta=1e4, rope_type="ntk", factor=0.0),
    dict(head_dim=8, theta=1e4, rope_type="llama3", low_freq_factor=4.0, high_freq_factor=4.0),
    dict(head_dim=8, theta=1e4, rope_type="linear", attention_factor=1.2),
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        rope_inv_freq(**kwargs)


# ----------------------------------------------------------------------------- rotation
def _naive_rope(x, positions, inv_freq, scale):
    """Pair j = x[j] + i x[j + H/2] multiplied by scale * e^(i p inv_freq[j]), one position at a time."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            p = int(positions[b][t])
            for n in range(x.shape[2]):
                for j in range(half):
                    z = complex(x[b, t, n, j], x[b, t, n, j + half])
                    z *= scale * cmath.exp(1j * p * float(inv_freq[j]))
                    out[b, t, n, j], out[b, t, n, j + half] = z.real, z.imag
    return out


def test_pairs_are_halves_not_neighbours():
    inv, _ = rope_inv_freq(4, 10000.0)  # [1, 0.01]
    x = jnp.array([[[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]]])  # [B=1, T=1, N=2, H=4]
    out = np.asarray(apply_rope(x, jnp.array([[1]]), inv))
    np.testing.assert_allclose(out[0, 0, 0], [math.cos(1.0), 0.0, math.sin(1.0), 0.0], atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], [0.0, math.cos(0.01), 0.0, math.sin(0.01)], atol=1e-6)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_apply_rope_matches_complex_loop(rope_type):
    inv, scale = rope_inv_freq(8, 10000.0, rope_type, factor=4.0, original_max_len=64)
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)  # [B, T, N, H]
    positions = np.array([[0, 1, 2, 3, 4], [900, 17, 17, 0, 5]])  # [B, T]; unsorted, repeated
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), inv, scale)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _naive_rope(x, positions, inv, scale), atol=2e-4)


def test_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 16)).astype(np.float32)  # [H]
    inv, _ = rope_inv_freq(16, 10000.0)

    def score(m, n):
        rq = apply_rope(jnp.asarray(q)[None, None, None], jnp.array([[m]]), inv)  # [1, 1, 1, H]
        rk = apply_rope(jnp.asarray(k)[None, None, None], jnp.array([[n]]), inv)
        return float(jnp.sum(rq * rk))

    same_offset = [score(m, m - 3) for m in (3, 10, 250, 1000)]
    np.testing.assert_allclose(same_offset, same_offset[0], atol=1e-3)
    assert abs(score(4, 0) - same_offset[0]) > 1e-2


def test_positions_are_used_as_given():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 4, 2, 8)).astype(np.float32))  # [B, T, N, H]
    positions = jnp.array([[7, 0, 100, 3], [5, 6, 7, 8]])  # [B, T]: not 0..T-1
    inv, _ = rope_inv_freq(8, 10000.0)
    out = apply_rope(x, positions, inv)
    for b in range(2):
        for t in range(4):
            alone = apply_rope(x[b:b + 1, t:t + 1], positions[b:b + 1, t:t + 1], inv)  # [1, 1, N, H]
            np.testing.assert_allclose(out[b, t], alone[0, 0], atol=1e-6)
    by_index = apply_rope(x, jnp.broadcast_to(jnp.arange(4), (2, 4)), inv)
    assert not np.allclose(out, by_index, atol=1e-3)


def test_dtype_and_jit():
    inv, scale = rope_inv_freq(8, 10000.0, "yarn", factor=4.0, original_max_len=64)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 6, 2, 8)), jnp.bfloat16)  # [B, T, N, H]
    positions = jnp.arange(6)[None] + 40  # [1, T]
    out = jax.jit(apply_rope)(x, positions, inv, scale)
    assert out.dtype == jnp.bfloat16
    want = apply_rope(x.astype(jnp.float32), positions, inv, scale)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2)
    with pytest.raises(ValueError):
        apply_rope(x, positions, inv[:3])
