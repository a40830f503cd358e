"""Rotary position embeddings (RoPE) and the context-extension variants used by Llama-family checkpoints.

Two pieces:

* `rope_inv_freq` builds the per-pair angular frequency table once, on the host, in numpy. It is static
  data (a function of the config only), so it never needs tracing. Every variant reproduces the
  formula of Hugging Face transformers' `modeling_rope_utils.py`, so that imported checkpoints give the
  same logits. The table is computed in float64 and rounded once to float32; transformers computes it
  with float32 torch ops, so the two agree to a few float32 ulps, not bit for bit.
* `apply_rope` rotates queries or keys by their positions.

Letters: B batch, T length, N heads, H head dim. The rotation acts on H/2 pairs.

Pair convention (Hugging Face "rotate_half"): dimension j is paired with j + H/2, not with its
neighbour. Meta's original Llama code pairs neighbours (2j, 2j+1); Hugging Face conversion permutes
the q/k projection rows so that the halves convention applies. Weights imported from Meta's format
need that same permutation before they are used with this module.

Worked example (head_dim 4, theta 10000, position 1, one query [1, 0, 0, 0]):

    inv_freq, scale = rope_inv_freq(4, 10000.0)      # [1.0, 0.01], 1.0
    x = jnp.array([[[[1.0, 0.0, 0.0, 0.0]]]])        # [B=1, T=1, N=1, H=4]
    apply_rope(x, jnp.array([[1]]), inv_freq)        # [[[[cos 1, 0, sin 1, 0]]]]

Pair 0 is (x[0], x[2]) = (1, 0); rotated by angle 1 * 1.0 it becomes (cos 1, sin 1) in dims 0 and 2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from instruct_jax.model.config import ModelConfig

ROPE_TYPES = ("default", "linear", "ntk", "yarn", "llama3")


# ----------------------------------------------------------------------------- frequency tables
def _default(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/H) for pair i; float64 [H/2]. Pair 0 turns once per 2*pi positions, the last slowest."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _yarn(inv_freq: np.ndarray, head_dim: int, theta: float, factor: float, original_max_len: int,
          beta_fast: float, beta_slow: float) -> np.ndarray:
    """YaRN "NTK-by-parts" (Peng et al. 2023, arXiv:2309.00071, eq. 18-19), as transformers'
    `_compute_yarn_parameters` with `truncate=True` (its default).

    Pairs that turn more than beta_fast times over the original context keep their frequency
    (extrapolation); pairs that turn fewer than beta_slow times are divided by `factor`
    (interpolation); a linear ramp over pair indices blends the two in between.
    """

    def pair_index(rotations: float) -> float:
        # Solve original_max_len / wavelength_i = rotations for i, where wavelength_i = 2*pi*theta^(2i/H).
        return head_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    # truncate=True: round the band outward to whole pairs (floor / ceil), then clamp. The upper clamp is
    # H - 1 (not H/2 - 1) in transformers too; the ramp is clipped to [0, 1] anyway.
    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [H/2]
    return inv_freq * (1.0 - ramp) + (inv_freq / factor) * ramp


def _llama3(inv_freq: np.ndarray, factor: float, original_max_len: int, low_freq_factor: float,
            high_freq_factor: float) -> np.ndarray:
    """Llama 3.1 scaling, as transformers' `_compute_llama3_parameters` (and Meta's `apply_scaling`).

    Three bands by wavelength 2*pi/inv_freq:
      shorter than original_max_len / high_freq_factor  -> kept (fast pairs never saw a long context);
      longer than  original_max_len / low_freq_factor   -> divided by factor (plain interpolation);
      in between -> blend with smooth = (original_max_len / wavelength - low) / (high - low),
                    which runs from 0 at the long edge to 1 at the short edge.
    """
    wavelen = 2 * math.pi / inv_freq  # [H/2]
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)  # [H/2]
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen < original_max_len / high_freq_factor, inv_freq,
                    np.where(wavelen > original_max_len / low_freq_factor, inv_freq / factor, blended))


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  original_max_len: int = 8192, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  attention_factor: Optional[float] = None) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies and the cos/sin scale for one RoPE variant.

    Returns (inv_freq float32 [H/2], attention_scaling). Pair i of position p is rotated by the angle
    p * inv_freq[i]; cos and sin are multiplied by attention_scaling (1.0 except for yarn).

    rope_type:
      default  inv_freq_i = theta^(-2i/H).
      linear   position interpolation (kaiokendev; Chen et al. 2023): inv_freq / factor, the same as
               dividing positions by factor.
      ntk      static NTK-aware scaling (bloc97): the base becomes theta * factor^(H/(H-2)), which leaves
               pair 0 untouched and divides the slowest pair by exactly `factor`. This is the fixed-base
               formula of transformers' `_compute_ntk_parameters` (briefly present as rope_type "ntk");
               released transformers offers only "dynamic", which recomputes the base for each sequence
               length s as theta * (factor*s/L - (factor-1))^(H/(H-2)), L = max_position_embeddings. The
               two coincide only at s = L * (2 - 1/factor); a checkpoint trained with "dynamic" cannot
               be matched by a fixed table at every length.
      yarn     see `_yarn`; attention_scaling = 0.1 ln(factor) + 1 (1 when factor <= 1) unless
               `attention_factor` (transformers' rope_scaling["attention_factor"]) is given.
      llama3   see `_llama3`.
    Arguments past rope_type are read only by the variants that name them: factor (linear, ntk, yarn,
    llama3), original_max_len (yarn, llama3), low/high_freq_factor (llama3), beta_fast/slow and
    attention_factor (yarn). For yarn, `factor` is used as given; resolving it from a checkpoint config
    (some transformers versions derive it from max_position_embeddings / original_max_position_embeddings)
    is the importer's job.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    if attention_factor is not None and rope_type != "yarn":
        raise ValueError(f"attention_factor applies to rope_type 'yarn' only, got rope_type={rope_type!r}")

    attention_scaling = 1.0
    if rope_type == "default":
        inv_freq = _default(head_dim, theta)
    elif rope_type == "linear":
        inv_freq = _default(head_dim, theta) / factor
    elif rope_type == "ntk":
        if head_dim < 4:
            raise ValueError(f"ntk scaling needs head_dim >= 4 (exponent H/(H-2)), got {head_dim}")
        inv_freq = _default(head_dim, theta * factor ** (head_dim / (head_dim - 2)))
    elif rope_type == "yarn":
        inv_freq = _yarn(_default(head_dim, theta), head_dim, theta, factor, original_max_len,
                         beta_fast, beta_slow)
        if attention_factor is not None:
            attention_scaling = float(attention_factor)
        elif factor > 1.0:
            # YaRN eq. 22: sqrt(1/t) = 0.1 ln(s) + 1 compensates the entropy drop of longer contexts.
            attention_scaling = 0.1 * math.log(factor) + 1.0
    else:  # llama3
        if high_freq_factor <= low_freq_factor:
            raise ValueError("llama3 needs high_freq_factor > low_freq_factor, "
                             f"got {high_freq_factor} <= {low_freq_factor}")
        inv_freq = _llama3(_default(head_dim, theta), factor, original_max_len, low_freq_factor, high_freq_factor)
    return inv_freq.astype(np.float32), attention_scaling


def rope_params(cfg: "ModelConfig") -> tuple[np.ndarray, float]:
    """`rope_inv_freq` for a ModelConfig (or any object with the same rope_* fields)."""
    return rope_inv_freq(
        cfg.head_dim, cfg.rope_theta, cfg.rope_type, factor=cfg.rope_factor,
        original_max_len=cfg.rope_original_max_len, low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor, beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)


# ----------------------------------------------------------------------------- rotation
def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq, attention_scaling: float = 1.0) -> jnp.ndarray:
    """Rotate x [B, T, N, H] by positions [B, T] (integers, used as given: packed or offset sequences
    pass their own position ids). Returns [B, T, N, H] in x.dtype.

    For pair j = (x[..., j], x[..., j + H/2]) at position p, with a = p * inv_freq[j]:
        out[..., j]       = s * (x[..., j] cos a - x[..., j + H/2] sin a)
        out[..., j + H/2] = s * (x[..., j + H/2] cos a + x[..., j] sin a),   s = attention_scaling.
    Angles, cos/sin and the rotation are float32 whatever x.dtype is; the result is rounded once to
    x.dtype. (Transformers rounds cos/sin to x.dtype and rotates in x.dtype; for float32 inputs the two
    agree, for bfloat16 they differ by bfloat16 rounding.)
    """
    head_dim = x.shape[-1]
    inv_freq = jnp.asarray(inv_freq, dtype=jnp.float32)  # [H/2]
    if head_dim % 2 or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must have shape ({head_dim // 2},) for head dim {head_dim}, "
                         f"got {inv_freq.shape}")
    # A broadcast multiply, not an einsum/dot: JAX's default matmul precision may round float32 dot
    # inputs to TF32 or bfloat16 on accelerators, which at position ~1e5 shifts angles by whole turns.
    angles = jnp.asarray(positions).astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    cos = (jnp.cos(angles) * attention_scaling)[:, :, None, :]  # [B, T, 1, H/2]
    sin = (jnp.sin(angles) * attention_scaling)[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each; pair j = (x1[j], x2[j])
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, T, N, H]
    return out.astype(x.dtype)
