"""Where each of our parameters lives in a Hugging Face checkpoint, and how to move it either way.

Our tree stacks the L blocks (nn.scan) and splits heads; transformers keeps one 2-D
[out, in] matrix per layer. One table (`tensor_maps`) says, per leaf, which HF tensor holds
it and how the dims correspond, with one letter per dim:

    V vocab, D d_model, N query heads, K kv heads, H head dim, F mlp, L layers, C one class (reward)

    ours ("layers", "attn", "q")  [L, D, N, H]  <-  model.layers.{i}.self_attn.q_proj.weight  [(N H), D]
    ours ("layers", "attn", "o")  [L, N, H, D]  <-  model.layers.{i}.self_attn.o_proj.weight  [D, (N H)]
    ours ("lm_head",)             [D, V]        <-  lm_head.weight                            [V, D]

A parenthesised group is one HF dim holding several of ours, row-major: q_proj row n * H + h
is head n, element h. RoPE needs no reordering: both sides pair dim j with j + H/2.

Importing builds every leaf with `jax.make_array_from_callback`: each device's callback reads
only its own block of the HF tensor (a row range and a column range of a memory-mapped file),
so the host never holds a full copy of a parameter per device, nor blocks of devices it does
not address. Exporting brings one layer at a time back to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from instruct_jax.model.config import ModelConfig


class TensorSource(Protocol):
    """Anything holding HF-named, HF-shaped tensors (a safetensors checkpoint, a de-quantized GGUF)."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple = ()) -> np.ndarray: ...  # float32 tensor[index]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: tuple[str, ...]  # leaf in our params tree
    hf_name: str  # HF tensor name; "{i}" stands for the layer index of a stacked leaf
    hf_dims: tuple[str, ...]  # HF dims, each a string of our letters, e.g. ("NH", "D")
    dims: str  # our dims after the layer axis, e.g. "DNH"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def tensor_maps(cfg: ModelConfig, reward: bool = False) -> list[TensorMap]:
    """Every leaf of a Transformer's params (reward: RewardModel's, trunk + score head)."""
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("embedding",), "model.embed_tokens.weight", ("V", "D"), "VD"),
        TensorMap(("layers", "attn", "q"), layer + "self_attn.q_proj.weight", ("NH", "D"), "DNH"),
        TensorMap(("layers", "attn", "k"), layer + "self_attn.k_proj.weight", ("KH", "D"), "DKH"),
        TensorMap(("layers", "attn", "v"), layer + "self_attn.v_proj.weight", ("KH", "D"), "DKH"),
        TensorMap(("layers", "attn", "o"), layer + "self_attn.o_proj.weight", ("D", "NH"), "NHD"),
        TensorMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", ("D",), "D"),
        TensorMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", ("D",), "D"),
        TensorMap(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", ("F", "D"), "DF"),
        TensorMap(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", ("F", "D"), "DF"),
        TensorMap(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", ("D", "F"), "FD"),
        TensorMap(("final_norm", "scale"), "model.norm.weight", ("D",), "D"),
    ]
    if cfg.qkv_bias:
        maps[5:5] = [
            TensorMap(("layers", "attn", "q_bias"), layer + "self_attn.q_proj.bias", ("NH",), "NH"),
            TensorMap(("layers", "attn", "k_bias"), layer + "self_attn.k_proj.bias", ("KH",), "KH"),
            TensorMap(("layers", "attn", "v_bias"), layer + "self_attn.v_proj.bias", ("KH",), "KH"),
        ]
    if reward:
        maps = [dataclasses.replace(m, path=("trunk",) + m.path) for m in maps]
        maps.append(TensorMap(("head", "kernel"), "score.weight", ("C", "D"), "D"))
    elif not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", ("V", "D"), "DV"))
    return maps


def dim_sizes(cfg: ModelConfig, vocab_size: Optional[int] = None) -> dict[str, int]:
    return {"V": vocab_size or cfg.vocab_size, "D": cfg.d_model, "N": cfg.num_heads, "K": cfg.num_kv_heads,
            "H": cfg.head_dim, "F": cfg.mlp_dim, "L": cfg.num_layers, "C": 1}


def our_shape(m: TensorMap, sizes: dict[str, int]) -> tuple[int, ...]:
    return ((sizes["L"],) if m.stacked else ()) + tuple(sizes[c] for c in m.dims)


def hf_shape(m: TensorMap, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[c] for c in group) for group in m.hf_dims)


# ----------------------------------------------------------------------------- HF -> ours
def read_block(source: TensorSource, m: TensorMap, sizes: dict[str, int], name: str,
               index: dict[str, slice]) -> np.ndarray:
    """Our block [dims in m.dims order] of one HF tensor, reading only the rows/columns it needs.

    index: a slice with concrete start/stop per letter of m.dims. An HF dim grouping letters
    "NH" is read over the rows of the first letter's slice, whole in the others, which are
    then sliced in memory (they are whole anyway unless head_dim itself is sharded).
    """
    hf_index, block_shape, inner = [], [], []
    for group in m.hf_dims:
        outer = index.get(group[0], slice(0, 1))
        stride = math.prod(sizes[c] for c in group[1:])
        hf_index.append(slice(outer.start * stride, outer.stop * stride))
        block_shape += [outer.stop - outer.start] + [sizes[c] for c in group[1:]]
        inner += [slice(None)] + [index[c] for c in group[1:]]
    block = source.read(name, tuple(hf_index)).reshape(block_shape)[tuple(inner)]
    letters = "".join(m.hf_dims)
    if len(letters) != len(m.dims):  # a size-1 HF dim we don't keep (C of the score head)
        block = block.reshape([n for c, n in zip(letters, block.shape) if c in m.dims])
        letters = "".join(c for c in letters if c in m.dims)
    return block.transpose([letters.index(c) for c in m.dims]) if letters != m.dims else block


def _concrete(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def leaf_reader(source: TensorSource, m: TensorMap, sizes: dict[str, int]) -> Callable[[tuple], np.ndarray]:
    """index (a tuple of slices over our full leaf shape) -> float32 numpy block, for make_array_from_callback."""
    shape = our_shape(m, sizes)

    def read(index: tuple) -> np.ndarray:
        index = _concrete(index, shape)
        if not m.stacked:
            return read_block(source, m, sizes, m.hf_name, dict(zip(m.dims, index)))
        per_layer = dict(zip(m.dims, index[1:]))
        return np.stack([read_block(source, m, sizes, m.hf_name.format(i=i), per_layer)
                         for i in range(*index[0].indices(shape[0]))])

    return read


def check_source(source: TensorSource, maps: list[TensorMap], sizes: dict[str, int],
                 source_sizes: dict[str, int]) -> None:
    """Every tensor the maps need exists with the expected shape (source_sizes: the checkpoint's own V)."""
    for m in maps:
        names = [m.hf_name.format(i=i) for i in range(sizes["L"])] if m.stacked else [m.hf_name]
        expected = hf_shape(m, source_sizes)
        for name in names:
            if name not in source:
                raise KeyError(f"checkpoint has no tensor {name!r} (needed for {'/'.join(m.path)})")
            if tuple(source.shape(name)) != expected:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(source.shape(name))}, "
                                 f"expected {expected} from its config")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_tree(source: TensorSource, maps: list[TensorMap], sizes: dict[str, int], shardings: Any = None) -> dict:
    """Our params tree from `source`. With shardings (a tree like the params of NamedShardings) each
    device reads its own shard; without, each leaf is one array on the default device."""
    params: dict = {}
    for m in maps:
        read = leaf_reader(source, m, sizes)
        shape = our_shape(m, sizes)
        if shardings is None:
            value = jnp.asarray(read(tuple(slice(None) for _ in shape)))
        else:
            value = jax.make_array_from_callback(shape, _get(shardings, m.path), read)
        _set(params, m.path, value)
    return params


class PaddedVocab:
    """A source whose embedding / lm_head have `rows` rows: the checkpoint's, then copies of their mean.

    The extra rows give a tokenizer's reserved pad token (data/tokenizer.py) an embedding. Their
    value follows transformers' `resize_token_embeddings` (mean of the existing rows), so the
    new token is an average one rather than a zero vector with an arbitrary logit.
    """

    VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

    def __init__(self, source: TensorSource, rows: int):
        self.source, self.rows = source, rows

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.source.shape(name))
        return (self.rows,) + shape[1:] if name in self.VOCAB_TENSORS else shape

    @functools.lru_cache(maxsize=2)
    def _mean_row(self, name: str) -> np.ndarray:
        n = self.source.shape(name)[0]
        total = sum(self.source.read(name, (slice(i, min(i + 8192, n)),)).sum(0, dtype=np.float64)
                    for i in range(0, n, 8192))
        return (total / n).astype(np.float32)

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        if name not in self.VOCAB_TENSORS:
            return self.source.read(name, index)
        rows, cols = _concrete(index + (slice(None),) * (2 - len(index)), self.shape(name))
        have = self.source.shape(name)[0]
        real = self.source.read(name, (slice(rows.start, min(rows.stop, have)), cols)) if rows.start < have else None
        extra = max(rows.stop - max(rows.start, have), 0)
        pad = np.broadcast_to(self._mean_row(name)[cols], (extra, cols.stop - cols.start))
        return pad.copy() if real is None else np.concatenate([real, pad]) if extra else real


# ----------------------------------------------------------------------------- ours -> HF
def to_host(x: jax.Array) -> np.ndarray:
    """Whole float32 array on this host; a collective across processes when it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x, dtype=np.float32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True), dtype=np.float32)


def hf_tensor(params: dict, m: TensorMap, sizes: dict[str, int], layer: Optional[int] = None) -> np.ndarray:
    """One HF tensor (layer `layer` of a stacked leaf) from our params, on the host."""
    leaf = _get(params, m.path)
    if layer is not None:
        leaf = leaf[layer]  # one layer crosses to the host at a time
    block = to_host(leaf)
    if "V" in m.dims:  # keep the exported vocabulary's rows (sizes["V"] may drop a reserved pad row)
        block = np.take(block, np.arange(sizes["V"]), axis=m.dims.index("V"))
    letters = "".join(c for c in "".join(m.hf_dims) if c in m.dims)  # a size-1 C dim comes back in the reshape
    return block.transpose([m.dims.index(c) for c in letters]).reshape(hf_shape(m, sizes))


def hf_entries(maps: list[TensorMap], sizes: dict[str, int]) -> list[tuple[str, TensorMap, Optional[int]]]:
    """(HF name, its map, layer or None) for every tensor an export writes, in file order."""
    out = []
    for m in maps:
        if m.stacked:
            out += [(m.hf_name.format(i=i), m, i) for i in range(sizes["L"])]
        else:
            out.append((m.hf_name, m, None))
    return sorted(out, key=lambda e: _natural_key(e[0]))


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


# ----------------------------------------------------------------------------- targets and checks
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def target_params(cfg: ModelConfig, mesh, rules=None, reward: bool = False):
    """(abstract params carrying shardings, their NamedShardings) on `mesh`, exactly as training
    creates them (train/state.py); `mesh` may be abstract."""
    import functools

    from instruct_jax.parallel.mesh import MeshConfig
    from instruct_jax.parallel.sharding import param_shardings_for

    rules = rules if rules is not None else MeshConfig().logical_rules()
    if reward:
        from instruct_jax.model.heads import RewardModel, init_reward_params_boxed

        init = functools.partial(init_reward_params_boxed, RewardModel(cfg))
    else:
        from instruct_jax.model.transformer import Transformer, init_params_boxed

        init = functools.partial(init_params_boxed, Transformer(cfg))
    return param_shardings_for(init, mesh, rules)


def expected_names(maps: list, sizes: dict[str, int], tied: bool = False) -> set[str]:
    """Every HF tensor name the maps read (tied: plus the lm_head copy some tied checkpoints still store)."""
    names = {m.hf_name.format(i=i) for m in maps for i in range(sizes["L"])}
    return (names | {"lm_head.weight"}) if tied else names


def check_unused(names, expected: set[str]) -> None:
    """A checkpoint tensor outside `expected` means a feature we would silently drop: an error."""
    unused = [n for n in names if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if unused:
        raise ValueError(f"checkpoint tensors this model has no place for (unsupported architecture?): {unused[:8]}")
