"""Device meshes from a MeshConfig: within-slice (ICI) x across-slice (DCN) axis sizes.

A mesh axis of total size ici * dcn is laid out so that its dcn factor is the *outer*
part: neighbours along the axis sit in the same slice, and only every ici-th step
crosses a slice boundary (where links are slow). On a single slice dcn sizes are all 1.

Worked example (2 slices x 4 devices, data across slices, fsdp within):
    ici = {data: 1, fsdp: 4}, dcn = {data: 2, fsdp: 1}
    slice 0 holds devices 0..3, slice 1 holds 4..7
    mesh (data=2, fsdp=4) = [[0, 1, 2, 3],
                             [4, 5, 6, 7]]   -> the data axis crosses slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from instruct_jax.errors import ConfigError


MESH_AXES = ("data", "fsdp", "sequence", "tensor")  # outermost (slowest links) to innermost


# Logical axis name -> mesh axis (or tuple of axes, or None = replicated). Parameters and
# activations in the model name only logical axes; this table is the single place that
# decides how they map onto a mesh. Experiments override entries with `MeshConfig.rules`.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters: rank r is tiny, each adapter shards by its projection's other axes
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_head_dim", None),
    # KV cache [L, B, S, K, H] (decoding): rows like the batch, kv heads like the activations.
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)


@dataclass
class MeshConfig:
    # Within-slice (ICI) sizes. One of them may be -1: it takes all devices left over.
    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1
    # Across-slice (DCN) sizes, for multi-slice runs; their product is the slice count.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    # Overrides of DEFAULT_RULES entries: ((logical_name, mesh_axis_or_tuple_or_None), ...).
    rules: tuple = ()
    # The hardware this experiment is sized for (0 / "" = whatever runs it). Tests and
    # `plan` check the shardings against a device-free AbstractMesh of this size.
    num_devices: int = 0
    num_slices: int = 1
    topology: str = ""  # TPU topology name, e.g. "v5p:4x4x4" (64 chips)

    def ici_shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def dcn_shape(self) -> dict[str, int]:
        return {a: getattr(self, "dcn_" + a) for a in MESH_AXES}

    def logical_rules(self) -> tuple[tuple[str, Any], ...]:
        """DEFAULT_RULES with this experiment's overrides applied (order preserved)."""
        overrides = {name: axes for name, axes in self.rules}
        unknown = set(overrides) - {n for n, _ in DEFAULT_RULES}
        rules = [(n, overrides.get(n, a)) for n, a in DEFAULT_RULES]
        rules += [(n, overrides[n]) for n in overrides if n in unknown]
        return tuple(rules)


def _fill(sizes: dict[str, int], total: int, prefix: str, what: str) -> dict[str, int]:
    """Replace the one -1 entry so the product of sizes equals total."""
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{prefix}{free[1]}", f"only one {what} axis may be -1, got -1 for {free}")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{prefix}{a}", f"must be a positive size or -1, got {s}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if total % known:
            raise ConfigError(f"mesh.{prefix}{free[0]}",
                              f"cannot fill: {total} {what} devices are not divisible by the other axes' product {known}")
        sizes = {**sizes, free[0]: total // known}
    if math.prod(sizes.values()) != total:
        raise ConfigError(f"mesh.{prefix}{'/'.join(MESH_AXES)}",
                          f"{what} axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                          f"but there are {total} {what} devices")
    return sizes


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int, num_slices: int | None = None) -> dict[str, int]:
    """Total size of every mesh axis (ici * dcn), filling -1 entries; named errors on mismatch."""
    dcn = cfg.dcn_shape()
    if num_slices is None:
        num_slices = math.prod(s for s in dcn.values() if s != -1) if -1 not in dcn.values() else 1
    dcn = _fill(dcn, num_slices, "dcn_", "slice")
    if num_devices % num_slices:
        raise ConfigError("mesh.dcn_*", f"{num_devices} devices do not split into {num_slices} equal slices")
    ici = _fill(cfg.ici_shape(), num_devices // num_slices, "", "per-slice")
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def hybrid_device_grid(devices: Sequence, ici: dict[str, int], dcn: dict[str, int],
                       slice_of: Callable = lambda d: getattr(d, "slice_index", 0)) -> np.ndarray:
    """Arrange devices into an array of shape [ici[a] * dcn[a] for a in MESH_AXES].

    Pure function of the devices' ids and slice indices (testable on CPU with fake devices).
    Devices are grouped by slice, each slice laid out in id order with shape `ici`, and the
    slices themselves laid out with shape `dcn`; each axis then merges (dcn, ici) with dcn outer.
    """
    by_slice: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (slice_of(d), d.id)):
        by_slice.setdefault(slice_of(d), []).append(d)
    n_slices = math.prod(dcn.values())
    if len(by_slice) != n_slices:
        raise ConfigError("mesh.dcn_*", f"expected {n_slices} slices, devices report {len(by_slice)}")
    per_slice = math.prod(ici.values())
    for s, devs in by_slice.items():
        if len(devs) != per_slice:
            raise ConfigError("mesh", f"slice {s} has {len(devs)} devices, the ICI shape needs {per_slice}")
    n = len(MESH_AXES)
    grid = np.empty([n_slices, per_slice], dtype=object)
    for i, s in enumerate(sorted(by_slice)):
        grid[i, :] = by_slice[s]
    # [dcn..., ici...] -> interleave to [dcn_0, ici_0, dcn_1, ici_1, ...] -> merge pairs.
    grid = grid.reshape([dcn[a] for a in MESH_AXES] + [ici[a] for a in MESH_AXES])
    grid = grid.transpose([k for i in range(n) for k in (i, n + i)])
    return grid.reshape([dcn[a] * ici[a] for a in MESH_AXES])


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """Build the mesh (axis names MESH_AXES, Auto axis types) over the given or all devices."""
    devices = list(devices if devices is not None else jax.devices())
    slices = {getattr(d, "slice_index", 0) for d in devices}
    shape = resolve_mesh_shape(cfg, len(devices), num_slices=len(slices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(slices) == 1 and devices[0].platform == "tpu":
        # Let JAX pick a physical-topology-aware order of the chips within the slice. It knows one device per
        # chip only: a v4 slice whose two TensorCores are separate devices (libtpu's v4 descriptions) falls
        # back to the id order below.
        try:
            return jax.make_mesh([shape[a] for a in MESH_AXES], MESH_AXES, axis_types=auto, devices=devices)
        except AssertionError as e:
            if "megacore" not in str(e):
                raise
    ici = _fill(cfg.ici_shape(), len(devices) // len(slices), "", "per-slice")
    dcn = {a: shape[a] // ici[a] for a in MESH_AXES}
    if devices[0].platform == "tpu" and len(slices) > 1:
        # Several slices: each slice topology-aware (as above), the slices outer along the dcn axes.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES],
                                                    devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return Mesh(hybrid_device_grid(devices, ici, dcn), MESH_AXES, axis_types=auto)


def make_abstract_mesh(cfg: MeshConfig, num_devices: int, num_slices: int | None = None) -> AbstractMesh:
    """A device-free mesh of the real shape (for checking pod-scale shardings on a laptop)."""
    shape = resolve_mesh_shape(cfg, num_devices, num_slices)
    return AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the logical "batch" axis maps to under `rules` (rows are split over their product)."""
    axes = dict(rules)["batch"]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_shards(mesh_shape: dict[str, int], rules) -> int:
    """How many pieces a global batch is split into: the product of the batch axes' sizes. `mesh_shape` is a
    mesh's `.shape` or resolve_mesh_shape's dict."""
    return math.prod(mesh_shape[a] for a in batch_axes(rules))
