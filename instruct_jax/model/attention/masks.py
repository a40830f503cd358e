"""The mask every attention kernel shares, and the reference kernel it defines.

Letter legend (gemma style), used in every einsum of the model:
  B batch, T query length, S key/value length, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, D model dim.

The mask is derived from positions and segment ids, never from array indices or pad
tokens: a query may attend to a key iff both belong to the same non-zero segment and the
key's position is not after the query's. This one rule covers causal training, packed
rows (segment ids differ between examples), left/right padding (segment 0) and decoding
from a KV cache (cache slots carry their positions and segment ids).

Prefix-LM (PaliGemma): with per-token prefix flags (1 for an example's image tokens and
prompt, 0 elsewhere) a query also sees every key of its segment when both are prefix
tokens, so the prefix attends bidirectionally and the rest stays causal. Positions stay
sequential (RoPE is unchanged), which is why the prefix is its own mask input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# Finite stand-in for -inf: a fully masked row (a padding query) then softmaxes to a
# uniform distribution instead of NaN; such rows never reach a loss.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos, kv_pos, q_seg, kv_seg, q_prefix=None, kv_prefix=None):
    """Boolean [B, T, S]: key s is visible to query t.

    q_prefix [B, T] / kv_prefix [B, S] (both or neither): non-zero for prefix tokens, which
    see each other whatever their positions. None: causal everywhere, and no extra op.

    Worked example (one packed row: example A of 3 tokens, example B of 2, one pad):
        segment_ids = [1, 1, 1, 2, 2, 0]      positions = [0, 1, 2, 0, 1, 0]
        row t=4 (B's 2nd token) sees keys {3, 4}; row t=2 sees {0, 1, 2}; row t=5 sees nothing.
    With prefix = [1, 1, 0, 1, 1, 0] (A's first two tokens, all of B): row t=0 sees {0, 1},
    row t=3 sees {3, 4}; row t=2 (A's answer) still sees {0, 1, 2}.
    """
    same_segment = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    visible = kv_pos[:, None, :] <= q_pos[:, :, None]
    if (q_prefix is None) != (kv_prefix is None):
        raise ValueError("attention_mask: give prefix flags for both queries and keys, or for neither")
    if q_prefix is not None:
        visible = visible | ((q_prefix[:, :, None] != 0) & (kv_prefix[:, None, :] != 0))
    return same_segment & visible


def reference_attention(q, k, v, mask):
    """Plain einsum attention with grouped-query heads; softmax in float32.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool. Returns [B, T, N, H] in q.dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S] float32
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
    return out.reshape(b, t, n, h)
