"""A functional KV cache: a plain pytree that attention reads and returns updated.

Letters as in attention.py: L layers, B batch (cache slots), S cache length, T tokens
written by one call, K kv heads, H head dim.

Layout (one struct for the whole model; the L axis matches the nn.scan-stacked blocks):

    k, v         [L, B, S, K, H]  rotated keys / values, compute dtype
    positions    [B, S] int32     position of the token held in each slot
    segment_ids  [B, S] int32     segment of that token; 0 = empty slot or padding

The sampler's decode loop holds k and v per layer instead (`init(..., per_layer=True)`): tuples of
L separate [B, S, K, H] buffers. Each layer then updates its own buffer in place, one token's keys /
values a step, and attention reads it without a copy; slices of one stacked [L, ...] buffer would be
copied out and back every step (Transformer.cached_layers). Same values, same shardings per layer.

Slots are not positions. A row's tokens sit in slots in the order they were written; the
attention mask comes only from the stored positions and segment ids, through the same
rule as training (`attention_mask`: same non-zero segment and kv_pos <= q_pos). So a
left-padded prompt, a right-padded one, a prompt followed by decoded tokens, and rows of
a server batch at different lengths all need nothing special.

Worked example (S = 6, one row, prompt [a, b] left-padded to 3, then one decoded token c):

    after prefill at write index 0:   tokens   [pad, a, b, -, -, -]
                                      positions [0,  0, 1, 0, 0, 0]
                                      segments  [0,  1, 1, 0, 0, 0]
    after decode_step(c, position 2, write index 3):
                                      positions [0,  0, 1, 2, 0, 0]
                                      segments  [0,  1, 1, 1, 0, 0]
    c (position 2, segment 1) attends to slots {1, 2, 3}.

Prefix-LM (attention/masks.py) needs no cache field. Beyond causality, a prefix query
sees only the later prefix tokens of its own example, and when the whole prefix is prefilled
in one call those are keys of that same call: earlier slots hold earlier positions, which
causality already shows. So `slots(write_index, prefix)` marks just this call's slots with
its prefix flags ([B, S], zeros elsewhere); a prefill with a prefix gives the logits of a
full forward with it, and decode steps pass no prefix and stay causal. A prefix split over
two calls would leave the first call's queries blind to the second's keys: don't.

Each row has its own write index ([B] int32), so a server can hold requests of different
lengths in one batch and reuse a finished row's slots; batch-synchronous decoding (PPO
rollouts) passes the same index for every row.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from instruct_jax.parallel.context import logical_constraint

# Logical axis names (mapped to mesh axes by config.DEFAULT_RULES): batch over the batch mesh
# axes and kv heads over "tensor", like the activations that fill the cache.
KV_AXES = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "act_head_dim")  # [L, B, S, K, H]
LAYER_KV_AXES = KV_AXES[1:]  # [B, S, K, H]: one layer's slice, as attention sees it
SLOT_AXES = ("cache_batch", "cache_length")  # [B, S]


@flax.struct.dataclass
class CacheSlots:
    """The part of the cache every layer shares (broadcast over the scanned blocks).

    positions / segment_ids already include the tokens being written by this call.
    """

    positions: jax.Array  # [B, S] int32
    segment_ids: jax.Array  # [B, S] int32
    write_index: jax.Array  # [B] int32: slot of each row's first new token
    prefix: jax.Array | None = None  # [B, S] int32: this call's prefix-LM flags at its slots, 0 elsewhere; or None


@flax.struct.dataclass
class KVCache:
    k: jax.Array | tuple  # [L, B, S, K, H], or L x [B, S, K, H] (per_layer)
    v: jax.Array | tuple  # [L, B, S, K, H], or L x [B, S, K, H] (per_layer)
    positions: jax.Array  # [B, S] int32
    segment_ids: jax.Array  # [B, S] int32; 0 = slot holds nothing visible

    @classmethod
    def init(cls, cfg, batch: int, length: int, dtype=None, per_layer: bool = False) -> "KVCache":
        """An empty cache (every slot segment 0) for a ModelConfig; dtype defaults to cfg.dtype.

        per_layer: k and v as tuples of L separate [B, S, K, H] buffers instead of one [L, ...]
        array each (see the module docstring)."""
        dtype = jnp.dtype(dtype or cfg.dtype)
        layer_shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        slots = jnp.zeros((batch, length), jnp.int32)
        if per_layer:
            k = tuple(jnp.zeros(layer_shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(layer_shape, dtype) for _ in range(cfg.num_layers))
        else:
            k = v = jnp.zeros((cfg.num_layers,) + layer_shape, dtype)
        return cls(k, v, slots, slots).constrain()

    @property
    def is_per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @classmethod
    def logical_axes(cls) -> "KVCache":
        """The same struct holding each field's logical axis names as a PartitionSpec (for shardings)."""
        return cls(P(*KV_AXES), P(*KV_AXES), P(*SLOT_AXES), P(*SLOT_AXES))

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def constrain(self) -> "KVCache":
        """Pin every field to its logical sharding (a no-op outside a logical-rules context)."""
        def kv(x):
            if isinstance(x, (tuple, list)):
                return tuple(logical_constraint(layer, LAYER_KV_AXES) for layer in x)
            return logical_constraint(x, KV_AXES)

        return KVCache(kv(self.k), kv(self.v), logical_constraint(self.positions, SLOT_AXES),
                       logical_constraint(self.segment_ids, SLOT_AXES))

    def write_slots(self, positions: jax.Array, segment_ids: jax.Array, write_index: jax.Array) -> "KVCache":
        """Record the positions / segment ids ([B, T]) of T new tokens at slots write_index[b] + t.

        Done once per forward pass, before the layers run, so that every layer's attention
        already sees the new tokens as keys (a token attends to itself).
        """
        return self.replace(positions=write(self.positions, positions, write_index),
                            segment_ids=write(self.segment_ids, segment_ids, write_index))

    def slots(self, write_index: jax.Array, prefix: jax.Array | None = None) -> CacheSlots:
        """The slot metadata for a call writing at write_index; prefix: the call's [B, T] prefix-LM flags."""
        index = jnp.broadcast_to(jnp.asarray(write_index, jnp.int32), self.positions.shape[:1])  # [B]
        slot_prefix = None
        if prefix is not None:
            slot_prefix = write(jnp.zeros_like(self.positions), jnp.asarray(prefix, jnp.int32), index)
            slot_prefix = logical_constraint(slot_prefix, SLOT_AXES)
        return CacheSlots(self.positions, self.segment_ids, index, slot_prefix)


def write(buffer: jax.Array, new: jax.Array, write_index: jax.Array) -> jax.Array:
    """buffer[b, write_index[b] + t] = new[b, t] for every row b; buffer [B, S, ...], new [B, T, ...].

    write_index is [B] (or a scalar, used for every row). The caller keeps
    write_index + T <= S: like lax.dynamic_update_slice, an index past the end is clamped,
    which would silently overwrite the last slots.
    """
    index = jnp.broadcast_to(jnp.asarray(write_index, jnp.int32), buffer.shape[:1])  # [B]

    def one_row(row, new_row, i):  # [S, ...], [T, ...], scalar
        return jax.lax.dynamic_update_slice_in_dim(row, new_row.astype(row.dtype), i, axis=0)

    # vmap turns the per-row update into one scatter whose batch dimension is a batching
    # dimension, which the SPMD partitioner keeps local to each batch shard.
    return jax.vmap(one_row)(buffer, new, index)
