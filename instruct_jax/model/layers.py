"""Transformer block pieces: RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.

Parameters are float32 and declare logical axes; computation runs in `cfg.dtype`
(bfloat16 on accelerators) with float32 norms statistics and softmax. Einsum letters as
in attention.py: B batch, T length, S cache length, N heads, K kv heads, H head dim,
D model, F mlp.

Decoding threads a KV cache through the blocks functionally (see kv_cache.py): a block
takes this layer's cache buffers `kv` and the shared slot metadata `slots`, and returns
the buffers with the new keys/values written. Without a cache both are None and the
block is exactly the training block.

prefix ([B, T] int32 or None) marks prefix-LM tokens (attention/masks.py): they attend to
each other bidirectionally. None adds nothing to the program.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from instruct_jax.model.attention.dispatch import dot_product_attention
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.kv_cache import LAYER_KV_AXES, CacheSlots, write
from instruct_jax.model.lora import adapter_delta
from instruct_jax.model.rope import apply_rope, rope_params
from instruct_jax.parallel.context import logical_constraint

constrain = logical_constraint


def _param(module: nn.Module, name: str, shape, axes, init):
    """A float32 parameter carrying its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. Returns (out [B, T, D], kv).

    kv: None (training: tokens attend among themselves) or this layer's cache buffers
    (k, v), each [B, S, K, H]; the new tokens' keys/values are written at
    slots.write_index and the queries attend over the whole cache, masked by the slots'
    positions and segment ids. The returned kv is the updated pair (or None).

    prefix: [B, T] prefix-LM flags of the queries, or None; the keys' flags are the same
    array in training, slots.prefix with a cache (only this call's tokens can be prefix
    keys there: kv_cache.py).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, slots: CacheSlots | None = None, prefix=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.init_std)
        wq = _param(self, "q", (d, n, h), ("embed", "heads", "head_dim"), init)
        wk = _param(self, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), init)
        wv = _param(self, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), init)
        wo = _param(self, "o", (n, h, d), ("heads", "head_dim", "embed"), init)

        q = jnp.einsum("BTD,DNH->BTNH", x, wq.astype(dtype))
        k_ = jnp.einsum("BTD,DKH->BTKH", x, wk.astype(dtype))
        v = jnp.einsum("BTD,DKH->BTKH", x, wv.astype(dtype))
        q, k_, v = (y if delta is None else y + delta for y, delta in (
            (q, adapter_delta(self, "q", x, (d,), ("embed",), (n, h), ("heads", "head_dim"), cfg)),
            (k_, adapter_delta(self, "k", x, (d,), ("embed",), (k, h), ("kv_heads", "head_dim"), cfg)),
            (v, adapter_delta(self, "v", x, (d,), ("embed",), (k, h), ("kv_heads", "head_dim"), cfg))))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (n, h), ("heads", "head_dim"), zeros).astype(dtype)
            k_ = k_ + _param(self, "k_bias", (k, h), ("kv_heads", "head_dim"), zeros).astype(dtype)
            v = v + _param(self, "v_bias", (k, h), ("kv_heads", "head_dim"), zeros).astype(dtype)
        q = constrain(q, ("batch", "length", "act_heads", "act_head_dim"))
        k_ = constrain(k_, ("batch", "length", "act_kv_heads", "act_head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "act_head_dim"))

        inv_freq, scaling = rope_params(cfg)
        q = apply_rope(q, positions, inv_freq, scaling)
        k_ = apply_rope(k_, positions, inv_freq, scaling)

        if kv is None:
            kv_pos, kv_seg, kv_prefix = positions, segment_ids, prefix
        else:
            k_ = constrain(write(kv[0], k_, slots.write_index), LAYER_KV_AXES)  # [B, S, K, H]
            v = constrain(write(kv[1], v, slots.write_index), LAYER_KV_AXES)  # [B, S, K, H]
            kv_pos, kv_seg, kv_prefix = slots.positions, slots.segment_ids, slots.prefix  # [B, S]
            kv = (k_, v)
        out = dot_product_attention(q, k_, v, positions, kv_pos, segment_ids, kv_seg,
                                    implementation=cfg.attention, block_q=cfg.attention_block_q,
                                    block_kv=cfg.attention_block_kv, self_attention=kv is None,
                                    q_prefix=prefix, kv_prefix=kv_prefix)  # [B, T, N, H]
        out = checkpoint_name(out, "attn_out")
        y = jnp.einsum("BTNH,NHD->BTD", out, wo.astype(dtype))
        delta = adapter_delta(self, "o", out, (n, h), ("heads", "head_dim"), (d,), ("embed",), cfg)
        return (y if delta is None else y + delta), kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        w_gate = _param(self, "gate", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), init)
        w_up = _param(self, "up", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), init)
        w_down = _param(self, "down", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), init)
        d, f = cfg.d_model, cfg.mlp_dim

        def adapted(y, name, inp, in_dims, in_axes, out_dims, out_axes):
            delta = adapter_delta(self, name, inp, in_dims, in_axes, out_dims, out_axes, cfg)
            return y if delta is None else y + delta

        gate = adapted(jnp.einsum("BTD,DF->BTF", x, w_gate.astype(dtype)), "gate", x, (d,), ("embed",), (f,), ("mlp",))
        up = adapted(jnp.einsum("BTD,DF->BTF", x, w_up.astype(dtype)), "up", x, (d,), ("embed",), (f,), ("mlp",))
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return adapted(jnp.einsum("BTF,FD->BTD", hidden, w_down.astype(dtype)), "down", hidden, (f,), ("mlp",), (d,),
                       ("embed",))


class Block(nn.Module):
    """Pre-norm residual block with the nn.scan signature (carry, *inputs) -> (carry, output).

    Serial (Llama):   h = x + attn(attn_norm(x));  out = h + mlp(mlp_norm(h))
    Parallel (PaLM, cfg.parallel_block): out = x + attn(norm(x)) + mlp(norm(x)), one norm
    shared by both branches, so attention and the MLP read the same input and their input
    matmuls can run side by side (PaLM section 2: ~15% faster at scale, same quality).

    positions, segment_ids, slots and prefix are broadcast to every layer; kv (this
    layer's cache buffers, or None) is scanned over the stacked layer axis, and the updated
    buffers are the scan's per-layer output (None without a cache).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, slots: CacheSlots | None = None, prefix=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if cfg.parallel_block:
            normed = RMSNorm(cfg.norm_eps, dtype, name="norm")(x)
            attn_out, kv = Attention(cfg, name="attn")(normed, positions, segment_ids, kv, slots, prefix)
            out = x + attn_out + MLP(cfg, name="mlp")(normed)
            return constrain(out, ("batch", "length", "act_embed")), kv
        attn_out, kv = Attention(cfg, name="attn")(RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x),
                                                   positions, segment_ids, kv, slots, prefix)
        h = x + attn_out
        out = h + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(h))
        return constrain(out, ("batch", "length", "act_embed")), kv
