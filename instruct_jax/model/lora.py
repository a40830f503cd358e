"""LoRA (Hu et al. 2021): low-rank adapters on chosen projections, the base weights frozen.

A projection W with input dims I (e.g. (D,) for q, (N, H) for o) and output dims O gets two float32 params beside
it, `<name>_lora_a` [*I, r] and `<name>_lora_b` [r, *O], carrying the projection's own logical axes plus
"lora_rank" (replicated by the default rules), so they shard like W. The projection becomes

    y = x W + (alpha / r) * (x A) B          A ~ N(0, 1 / fan_in), B = 0: a fresh adapter changes nothing

`model.lora_rank` r > 0 turns it on for `model.lora_targets`. Training then updates only the adapters (and a
reward / value model's scalar head): `train/optimizer.py: freeze_base` keeps optimizer state for those alone, and
`freeze_base_grads` zeroes the base's gradients so none is accumulated, clipped or counted. The base with B = 0
(`base_only`) is the model the adapters started from: PPO's reference, with no second copy of the weights.

Every params export is merged (`merge_adapters`: W + (alpha / r) A B, adapters dropped), so evaluation, serving,
interop and the next phase read a plain model; a LoRA run starting from an export gets fresh adapters
(`checkpoint.load_params`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # model.lora_targets: the projections that can adapt
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def adapter_delta(module: nn.Module, name: str, x: jax.Array, in_shape: tuple, in_axes: tuple, out_shape: tuple,
                  out_axes: tuple, cfg) -> jax.Array | None:
    """(alpha / r) * (x A) B for the projection `name` of `module` (x [..., *in_shape] -> [..., *out_shape]), or
    None when the model has no adapter there. Declares the two params."""
    if cfg.lora_rank <= 0 or name not in cfg.lora_targets:
        return None
    r, dtype = cfg.lora_rank, jnp.dtype(cfg.dtype)
    a = module.param(name + SUFFIX_A, nn.with_logical_partitioning(nn.initializers.normal(a_std(in_shape)),
                                                                   in_axes + ("lora_rank",)),
                     tuple(in_shape) + (r,), jnp.float32)
    b = module.param(name + SUFFIX_B, nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + out_axes),
                     (r,) + tuple(out_shape), jnp.float32)
    h = jnp.tensordot(x, a.astype(dtype), axes=len(in_shape))  # [..., r]
    return (cfg.lora_alpha / r) * jnp.tensordot(h, b.astype(dtype), axes=1)


def a_std(in_shape: tuple) -> float:
    """A's initial standard deviation, 1 / sqrt(fan_in), fan_in the product of the projection's input dims."""
    return 1.0 / math.sqrt(math.prod(in_shape))


def fresh_adapters(abstract_params, seed: int):
    """`abstract_params` (ShapeDtypeStructs with shardings) with each adapter leaf created on its sharding as
    `adapter_delta` initialises it (B = 0, A ~ N(0, a_std) from fold_in(PRNGKey(seed), leaf index)); other leaves
    stay abstract. A's input dims are all but its last (rank), less the leading layer axis of the scanned stack
    (model/transformer.py's "layers")."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    out = []
    for i, (path, x) in enumerate(leaves):
        name = _key_name(path[-1])
        if name.endswith(SUFFIX_B):
            out.append(jax.jit(lambda shape=x.shape, dtype=x.dtype: jnp.zeros(shape, dtype),
                               out_shardings=x.sharding)())
        elif name.endswith(SUFFIX_A):
            stacked = any(_key_name(e) == "layers" for e in path)
            std, key = a_std(x.shape[1 if stacked else 0:-1]), jax.random.fold_in(jax.random.PRNGKey(seed), i)
            out.append(jax.jit(lambda k, shape=x.shape, dtype=x.dtype, std=std:
                               std * jax.random.normal(k, shape, dtype), out_shardings=x.sharding)(key))
        else:
            out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def is_adapter(path) -> bool:
    """A leaf path (jax.tree_util key path) of an adapter param."""
    return any(_key_name(e).endswith((SUFFIX_A, SUFFIX_B)) for e in path)


def is_trainable(path, train: tuple = ()) -> bool:
    """What a LoRA run trains: the adapters, the scalar head of a reward / value model ({"trunk", "head"}), and any
    param with a name in `train` (model.lora_train) on its path."""
    return (is_adapter(path) or (len(path) > 0 and _key_name(path[0]) == "head")
            or any(_key_name(e) in train for e in path))


def has_adapters(tree) -> bool:
    return any(is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def freeze_base_grads(grads, train: tuple = ()):
    """Gradients with the frozen base's entries zero (unchanged for a tree without adapters); `train`: the names
    trained in full (model.lora_train). Under jit the base's weight gradients are then dead code, never computed."""
    if not has_adapters(grads):
        return grads
    return jax.tree_util.tree_map_with_path(lambda p, g: g if is_trainable(p, train) else jnp.zeros_like(g), grads)


def base_is_reference(cfg) -> bool:
    """A LoRA model whose whole trained part is its adapters (model.lora_train empty): its base, adapters off, is
    the model it started from, so RL and DPO use it as the reference instead of a second copy of the weights."""
    return cfg.lora_rank > 0 and not cfg.lora_train


def base_only(params):
    """The params with every B = 0: the model the adapters started from (the reference of a LoRA policy). Only
    the small B leaves are new arrays; the base weights are the same buffers."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _key_name(p[-1]).endswith(SUFFIX_B) else x, params)


def merge_adapters(params, cfg):
    """W + (alpha / r) A B for every adapted projection, the adapters dropped: a plain model's params whose forward
    equals the adapted one. A tree without adapters is returned as is. Stacked layers ([L, ...] leaves) merge per
    layer."""
    if not has_adapters(params):
        return params
    scale = cfg.lora_alpha / cfg.lora_rank

    def merge(node):
        if not isinstance(node, dict):
            return node
        out = {k: merge(v) for k, v in node.items() if not k.endswith((SUFFIX_A, SUFFIX_B))}
        for key in node:
            if key.endswith(SUFFIX_A):
                base = key[:-len(SUFFIX_A)]
                a, b, w = node[key], node[base + SUFFIX_B], node[base]
                extra = a.ndim - (w.ndim - (b.ndim - 1)) - 1  # leading stacked axes (layers) of a beyond W's inputs
                fn = lambda a_, b_: jnp.tensordot(a_, b_, axes=1)  # noqa: E731
                for _ in range(extra):
                    fn = jax.vmap(fn)
                out[base] = w + scale * fn(a, b).astype(w.dtype)
        return out

    return merge(params)


def drop_adapters(tree):
    """The tree without its adapter leaves (what a merged export holds)."""
    if not isinstance(tree, dict):
        return tree
    return {k: drop_adapters(v) for k, v in tree.items() if not k.endswith((SUFFIX_A, SUFFIX_B))}


def with_fresh_adapters(loaded, fresh):
    """`fresh` (a full tree with adapters) with every non-adapter leaf taken from `loaded` (a tree without)."""
    if not isinstance(fresh, dict):
        return loaded
    return {k: (v if k.endswith((SUFFIX_A, SUFFIX_B)) else with_fresh_adapters(loaded[k], v)) for k, v in fresh.items()}


def merged_for_export(params, cfg):
    """merge_adapters under jit (sharded params in, a plain model's params out); params without adapters as they are."""
    if not has_adapters(params):
        return params
    return jax.jit(lambda p: merge_adapters(p, cfg))(params)
