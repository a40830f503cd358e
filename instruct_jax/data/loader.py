"""A deterministic, host-sharded loader: the global batch at step s is a pure function of (seed, s).

How a step becomes rows. Each epoch e shuffles the examples with a generator seeded by (seed, e)
and, for LM examples with packing on, greedily packs them in that order into rows
(packing.greedy_pack). Epochs are laid end to end into one endless stream of rows; step s takes
rows [s * B, (s + 1) * B) of it (a batch may straddle two epochs). Nothing depends on the number
of hosts or devices, on earlier iterator calls, or on wall-clock, so

  * every host computes the same plan and builds only the rows its devices hold, wherever the mesh
    puts them (`process_rows`, `jax.make_array_from_callback`);
  * resuming needs only the step: `loader.iterate(s, sharding)` continues the exact sequence.

    loader = Loader(examples, global_batch_size=8, seq_len=128, seed=0, pad_id=tok.pad_id)
    batch = loader.global_batch(3)            # dict of numpy [8, 128] arrays (packing.py layout)
    it = loader.iterate(ckpt_step, NamedSharding(mesh, P(("data", "fsdp"))))
    for batch in it: ...                      # dict of jax.Arrays; it.state() = next step to yield

Cost: finding step s plans every epoch before it (O(examples) each, cached); for the row counts
of many small epochs this is milliseconds per epoch.
"""

from __future__ import annotations

import bisect
import collections
import queue
import threading
from typing import Optional, Sequence

import numpy as np

from instruct_jax.data.examples import LMExample, PromptExample, RankingExample
from instruct_jax.data.packing import (greedy_pack, joined_images, pack_lm_row, prefix_flags, prompt_row, ranking_row,
                                      stack_rows, with_image_slots)
from instruct_jax.data.store import ExampleStore

IMAGE_KEYS = ("images", "image_mask")  # a row's image slots (packing.py)
_PLANS_KEPT = 4  # epoch plans cached; older ones are recomputed if asked for again


class Loader:
    def __init__(self, examples: Sequence, global_batch_size: int, seq_len: int, seed: int, *, pad_id: int,
                 packing: bool = True, shuffle: bool = True, prompt_len: Optional[int] = None,
                 padding_side: str = "left", max_responses: int = 0, prefetch: int = 2, images=None):
        """examples: all LMExample, all PromptExample or all RankingExample (examples.py), or an ExampleStore
        (store.py: LM or prompt examples read by index, so a host reads only the examples of its rows).

        seq_len is the row length T for LM and ranking rows; prompts use prompt_len (default seq_len).
        packing applies to LM examples only; prompts and rankings are always one per row.
        max_responses: K slots of ranking rows (0 = the largest K among the examples).
        images: the model's ImageLayout (data/images.py): rows carry image slots (packing.py); None: text only.
        """
        if not len(examples):
            raise ValueError("the loader got no examples (every row skipped or dropped? see the data report)")
        stored = isinstance(examples, ExampleStore)
        kinds = {examples.example_type} if stored else {type(e) for e in examples}
        if len(kinds) != 1 or not kinds <= {LMExample, PromptExample, RankingExample}:
            raise TypeError(f"examples must all be one of LMExample, PromptExample, RankingExample; got {kinds}")
        if global_batch_size <= 0 or seq_len <= 0 or seed < 0:
            raise ValueError(f"need global_batch_size > 0, seq_len > 0, seed >= 0; got "
                             f"{global_batch_size}, {seq_len}, {seed}")
        # A store is read by index, per step, only the examples of the rows asked for; a list is held whole.
        self.examples = examples if stored else list(examples)
        self.kind = kinds.pop()
        self.global_batch_size, self.seq_len, self.seed = global_batch_size, seq_len, seed
        self.pad_id, self.shuffle, self.prefetch = pad_id, shuffle, prefetch
        self.packing = packing and self.kind is LMExample
        self.prompt_len = prompt_len or seq_len
        self.padding_side = padding_side
        self.images = images
        if images is not None and stored:
            raise ValueError("a store holds token examples only; examples with images are read in memory")
        self._image_counts = None
        if images is not None and self.kind is LMExample:
            self._image_counts = np.array([0 if e.images is None else len(e.images) for e in self.examples])
        if self.kind is RankingExample:
            self.k_slots = max_responses or max(e.k for e in self.examples)
        self._lengths = None
        if self.kind is LMExample:
            self._lengths = examples.lengths if stored else np.array([e.length for e in self.examples])
        self._epoch_starts = [0]  # first stream row of each planned epoch, plus the end of the last
        self._plans: collections.OrderedDict[int, list] = collections.OrderedDict()  # epoch -> plan, LRU
        self._lock = threading.RLock()  # the prefetch thread and the caller share the plan cache

    # ------------------------------------------------------------------------- the plan
    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Rows of one epoch, each a list of example indices (one index unless packed)."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is not None:
                self._plans.move_to_end(epoch)  # now the most recently used; eviction takes the oldest
            else:
                order = np.arange(len(self.examples))
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
                if self.packing:
                    counts = None if self._image_counts is None else self._image_counts[order]
                    slots = 0 if self.images is None else self.images.max_images
                    plan = [[int(order[i]) for i in row]
                            for row in greedy_pack(self._lengths[order], self.seq_len, counts=counts,
                                                   count_capacity=slots)]
                else:
                    plan = [[int(i)] for i in order]
                self._plans[epoch] = plan
                while len(self._plans) > _PLANS_KEPT:
                    self._plans.popitem(last=False)
            return plan

    def _row(self, index: int) -> list[int]:
        """Example indices of row `index` of the endless stream of epochs."""
        with self._lock:
            while self._epoch_starts[-1] <= index:
                epoch = len(self._epoch_starts) - 1
                self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_plan(epoch)))
            epoch = bisect.bisect_right(self._epoch_starts, index) - 1
            return self.epoch_plan(epoch)[index - self._epoch_starts[epoch]]

    def epoch_of_step(self, step: int) -> int:
        """The epoch the first row of `step` belongs to (for logging)."""
        index = step * self.global_batch_size
        self._row(index)
        return bisect.bisect_right(self._epoch_starts, index) - 1

    # ------------------------------------------------------------------------- batches
    def _build_row(self, examples: list) -> dict[str, np.ndarray]:
        if self.kind is LMExample:
            return with_image_slots(pack_lm_row(examples, self.seq_len, self.pad_id), joined_images(examples),
                                    self.images)
        (example,) = examples
        if self.kind is PromptExample:
            return with_image_slots(prompt_row(example, self.prompt_len, self.pad_id, self.padding_side),
                                    example.images, self.images)
        row = ranking_row(example, self.k_slots, self.seq_len, self.pad_id)
        if self.images is None:
            return row
        pixels, mask = self.images.slots(example.images)
        k = self.k_slots
        out = {**row, "images": np.broadcast_to(pixels, (k,) + pixels.shape).copy(),
               "image_mask": np.broadcast_to(mask, (k,) + mask.shape).copy()}
        if self.images.prefix_lm:
            out["prefix"] = prefix_flags(row)
        return out

    def rows(self, step: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the global batch at `step`, stacked."""
        return self.rows_at(step, range(start, stop))

    def rows_at(self, step: int, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `indices` (positions in the global batch at `step`, in that order), stacked."""
        first = step * self.global_batch_size
        plans = [self._row(first + int(r)) for r in indices]
        if isinstance(self.examples, ExampleStore):  # read each example of these rows once, and nothing else
            got = self.examples.fetch(i for plan in plans for i in plan)
        else:
            got = self.examples
        return stack_rows([self._build_row([got[i] for i in plan]) for plan in plans])

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        """The whole batch at `step`: dict of numpy arrays with leading axis global_batch_size."""
        return self.rows(step, 0, self.global_batch_size)

    def host_batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        """The contiguous block of rows host `process_index` of `process_count` would own if the batch axis
        were split evenly in process order (a reference for tests; real runs build `process_rows`)."""
        if self.global_batch_size % process_count:
            raise ValueError(f"global batch {self.global_batch_size} does not split over {process_count} hosts")
        per_host = self.global_batch_size // process_count
        return self.rows(step, process_index * per_host, (process_index + 1) * per_host)

    def iterate(self, start_step: int = 0, sharding=None, prefetch: Optional[int] = None) -> "LoaderIterator":
        """Batches from `start_step` on: jax.Arrays laid out by `sharding` (a NamedSharding for the
        batch; its first axis splits the rows), or numpy global batches when sharding is None."""
        if not isinstance(start_step, (int, np.integer)):
            raise TypeError(f"iterate(start_step, sharding): start_step must be a step number, got {start_step!r}")
        return LoaderIterator(self, sharding, int(start_step), self.prefetch if prefetch is None else prefetch)

    def device_batch(self, step: int, sharding) -> dict:
        """One step's batch as jax.Arrays, built without a thread (evaluation reads a few fixed steps)."""
        return make_batch(self, sharding, process_rows(sharding, self.global_batch_size), step)


# ----------------------------------------------------------------------------- sharded iteration
def _leading_axes_sharding(sharding, ndim: int):
    """The same sharding for an array of rank ndim (a [B] lengths array under a P(batch, length) spec)."""
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(sharding.spec)[:ndim]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def device_rows(sharding, global_batch_size: int, process_index: Optional[int] = None) -> dict:
    """{device: global batch rows it holds (a range)} for the devices of process `process_index` (default:
    this process) under `sharding`'s first axis. Reads only the devices' `process_index`, so it also works
    for devices of a described TPU topology (tests simulate every host of a pod this way)."""
    import jax

    one_axis = _leading_axes_sharding(sharding, 1)
    if process_index is None:
        process_index = jax.process_index()
    return {device: range(*index[0].indices(global_batch_size))
            for device, index in one_axis.devices_indices_map((global_batch_size,)).items()
            if device.process_index == process_index}


def process_rows(sharding, global_batch_size: int, process_index: Optional[int] = None) -> np.ndarray:
    """The sorted global batch rows the devices of a process hold under `sharding`, whatever the mesh's
    device order: on a real pod a host's devices need not hold one block (`jax.make_mesh` on v5p:4x4x4
    gives host 0 rows 0-1, 8-9, 32-33, 40-41 of 64), and each host builds exactly these rows."""
    rows = set()
    for held in device_rows(sharding, global_batch_size, process_index).values():
        rows.update(held)
    return np.asarray(sorted(rows), np.int64)


def shard_of(local: np.ndarray, rows: np.ndarray, index: tuple, global_batch_size: int) -> np.ndarray:
    """A device's shard (`index`: its slices of the global array) cut from `local`, the stacked global
    batch rows `rows` (sorted) that this process built."""
    wanted = np.arange(*index[0].indices(global_batch_size))
    at = np.searchsorted(rows, wanted)
    if at.size and (at[-1] >= rows.size or not np.array_equal(rows[at], wanted)):
        raise ValueError(f"batch rows {wanted.tolist()} asked for, but this process built {rows.tolist()}")
    return local[(at,) + tuple(index[1:])]


def make_batch(loader: Loader, sharding, rows: np.ndarray, step: int) -> dict:
    """The rows `rows` of step's global batch (numpy, in that order) when sharding is None; else jax.Arrays
    of the global shape whose addressable shards are cut from those rows (`jax.make_array_from_callback`:
    each local device gets its slice, wherever its rows sit in the batch)."""
    local = loader.rows_at(step, rows)
    if sharding is None:
        return local
    import jax

    rows = np.asarray(rows)

    def array(key: str, value: np.ndarray):
        # image slots split by rows only (their M and pixel axes are not the token layout's)
        ndim = 1 if key in IMAGE_KEYS else value.ndim
        return jax.make_array_from_callback((loader.global_batch_size,) + value.shape[1:],
                                            _leading_axes_sharding(sharding, ndim),
                                            lambda index: shard_of(value, rows, index, loader.global_batch_size))

    return {key: array(key, value) for key, value in local.items()}


def _produce(loader: Loader, sharding, rows: np.ndarray, step: int, out: queue.Queue,
             stop: threading.Event) -> None:
    """The prefetch thread: put (step, batch) for step, step + 1, ... until `stop` or the main thread ends.

    It holds no reference to the LoaderIterator, so an iterator dropped without close() is
    garbage-collected and its __del__ stops this thread. It is not a daemon thread: one still
    inside jax when the interpreter tears jax down aborts the process, so instead the interpreter
    waits for it at exit, and it notices the main thread has finished within 0.1 s.
    """
    def running() -> bool:
        return not stop.is_set() and threading.main_thread().is_alive()

    while running():
        try:
            item = (step, make_batch(loader, sharding, rows, step))
        except BaseException as e:  # hand the failure to the consumer rather than dying silently
            item = (step, e)
        while running():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item[1], BaseException):
            return
        step += 1


class LoaderIterator:
    """Yields the batches of steps start_step, start_step + 1, ...; `state()` is the next step."""

    def __init__(self, loader: Loader, sharding, start_step: int, prefetch: int):
        self._stop = threading.Event()
        self._queue: Optional[queue.Queue] = None
        self.loader, self.sharding = loader, sharding
        self._next_step = start_step
        self._rows = np.arange(loader.global_batch_size) if sharding is None else \
            process_rows(sharding, loader.global_batch_size)
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(
                target=_produce, args=(loader, sharding, self._rows, start_step, self._queue, self._stop),
                daemon=False, name="instruct_jax-data-prefetch")
            self._thread.start()

    def state(self) -> int:
        """The step the next batch belongs to: all a checkpoint needs to resume the data stream."""
        return self._next_step

    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self) -> dict:
        if self._queue is None:
            batch = make_batch(self.loader, self.sharding, self._rows, self._next_step)
        else:
            step, batch = self._queue.get()
            assert step == self._next_step, (step, self._next_step)
            if isinstance(batch, BaseException):
                raise batch
        self._next_step += 1
        return batch

    def close(self) -> None:
        """Stop the prefetch thread and wait for it (also on `with` exit; __del__ only signals it)."""
        self._stop.set()
        if self._queue is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)

    def __enter__(self) -> "LoaderIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
