"""Examples -> fixed-shape rows: greedy packing with segment ids, or plain padding.

A token batch is a dict of numpy arrays, each [B, T]:
    tokens       int32    model inputs
    targets      int32    the next token of each input position, within the same segment
    loss_mask    float32  1.0 where targets[t] counts in the loss
    positions    int32    position within its own segment, from 0
    segment_ids  int32    1, 2, ... per packed example in a row; 0 = padding
Padding positions hold tokens = targets = pad_id, loss_mask = 0, positions = 0, segment_ids = 0.
The model attends where (same nonzero segment id) & (key position <= query position), so packed
examples never see each other and each behaves exactly as if it were alone in a padded row.

Prompt rows (PPO) and ranking rows (reward model) have their own layouts, documented below.

Images (a model with model.vision): every row also holds its image slots, `images` [M, H, W, C] float32 (the
row's images in the order of their image tokens, zeros after) and `image_mask` [M] int32 (1 = a used slot);
a ranking row holds them once per response line ([K, M, ...], [K, M]), since the model reads each line as a row.
Packing puts at most M images in a row (`greedy_pack`'s `counts`). With `vision.prefix_lm`, rows also hold
`prefix` (int32, like tokens): 1 on each example's prompt, the tokens before its first target (`prefix_flags`),
which attend to each other bidirectionally (model/attention/masks.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from instruct_jax.data.examples import LMExample, PromptExample, RankingExample

LM_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def _empty_row(shape: tuple, pad_id: int) -> dict[str, np.ndarray]:
    return {"tokens": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
            "loss_mask": np.zeros(shape, np.float32), "positions": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32)}


def with_image_slots(row: dict, images, layout) -> dict:
    """row plus its image slots (module docstring) when a layout is given, and its prefix flags when the layout
    asks for them; row unchanged otherwise."""
    if layout is None:
        return row
    pixels, mask = layout.slots(images)
    out = {**row, "images": pixels, "image_mask": mask}
    if layout.prefix_lm:
        out["prefix"] = prefix_flags(row)
    return out


def prefix_flags(row: dict) -> np.ndarray:
    """int32 like row["tokens"]: 1 on every input token of a segment up to its first answer token (the prompt,
    through the assistant header: the inputs at and before the first position with a target); 0 on answers,
    later turns and padding. A prompt row (no loss_mask) is all prefix where real. Worked example, the packed
    row of `pack_lm_row`'s docstring (tokens [1, 5, 6, 1, 8, 0, 0, 0]):
        loss_mask [0, 1, 1, 1, 1, 0, 0, 0], segment_ids [1, 1, 1, 2, 2, 0, 0, 0] -> prefix [1, 1, 0, 1, 0, 0, 0, 0]
    (A's prompt is 1 5, its answer starts at 6; B's prompt is its BOS.)"""
    segments = row["segment_ids"]
    if "loss_mask" not in row:
        return (segments > 0).astype(np.int32)
    flat_seg, flat_mask = segments.reshape(-1, segments.shape[-1]), row["loss_mask"].reshape(-1, segments.shape[-1])
    out = np.zeros(flat_seg.shape, np.int32)
    for line, (seg, mask) in enumerate(zip(flat_seg, flat_mask)):
        seen: set = set()  # segments whose first target has passed
        for t in range(len(seg)):
            if seg[t] == 0:
                continue
            out[line, t] = int(seg[t]) not in seen  # no earlier position of its segment predicted an answer token
            if mask[t] > 0:
                seen.add(int(seg[t]))
    return out.reshape(segments.shape)


def joined_images(examples: Sequence) -> Optional[np.ndarray]:
    """The examples' images one after another (the order of their image tokens in a packed row), or None."""
    parts = [e.images for e in examples if e.images is not None and len(e.images)]
    return np.concatenate(parts) if parts else None


def pack_lm_row(examples: Sequence[LMExample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Place examples one after another in a row of seq_len positions (plain padding = one example).

    An example of n ids fills n - 1 positions: inputs ids[:-1], targets ids[1:], loss_mask weights[1:].
    Worked example, seq_len = 8, pad_id = 0:
        A: ids [1, 5, 6, 7], weights [0, 0, 1, 1]     (prompt 1 5, answer 6 7: 3 positions)
        B: ids [1, 8, 9],    weights [0, 1, 1]        (2 positions)
    pack_lm_row([A, B], 8, 0) ->
        tokens      [1, 5, 6, 1, 8, 0, 0, 0]
        targets     [5, 6, 7, 8, 9, 0, 0, 0]
        loss_mask   [0, 1, 1, 1, 1, 0, 0, 0]
        positions   [0, 1, 2, 0, 1, 0, 0, 0]
        segment_ids [1, 1, 1, 2, 2, 0, 0, 0]
    Position 3 (B's first token) predicts 8 from B alone: segment 2 can't attend to segment 1, and
    A's last id (7) is only a target, never an input, so nothing crosses the boundary.
    """
    row = _empty_row((seq_len,), pad_id)
    start = 0
    for segment, ex in enumerate(examples, start=1):
        n = ex.length
        if start + n > seq_len:
            raise ValueError(f"examples need {start + n} positions, the row has {seq_len}")
        span = slice(start, start + n)
        row["tokens"][span] = ex.ids[:-1]
        row["targets"][span] = ex.ids[1:]
        row["loss_mask"][span] = ex.weights[1:]
        row["positions"][span] = np.arange(n)
        row["segment_ids"][span] = segment
        start += n
    return row


def greedy_pack(lengths: Sequence[int], capacity: int, max_open: int = 8, counts: Optional[Sequence[int]] = None,
                count_capacity: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` positions, keeping the given order's spirit.

    First fit over the `max_open` most recently opened rows: each example goes into the first open
    row with room, else opens a row; when more than max_open rows are open the oldest is closed.
    Rows come out in the order they were opened. Deterministic, O(n * max_open). With `counts` (e.g. each
    example's images), a row also holds at most `count_capacity` of them.

        greedy_pack([5, 4, 3, 2], capacity=8) -> [[0, 2], [1, 3]]     (5+3, 4+2)
        greedy_pack([2, 2, 2], 8, counts=[1, 1, 0], count_capacity=1) -> [[0, 2], [1]]
    """
    counts = np.zeros(len(lengths), int) if counts is None else counts
    rows: list[list[int]] = []
    room: list[int] = []  # free positions of each row
    slots: list[int] = []  # free count of each row
    first_open = 0  # rows before this index are closed
    for i, (n, c) in enumerate(zip(lengths, counts)):
        if n > capacity:
            raise ValueError(f"example {i} needs {n} positions, more than a row's {capacity}")
        if c and c > count_capacity:
            raise ValueError(f"example {i} has {c} images, more than a row's {count_capacity} slots")
        target = next((r for r in range(first_open, len(rows)) if room[r] >= n and slots[r] >= c), None)
        if target is None:
            rows.append([])
            room.append(capacity)
            slots.append(count_capacity)
            target = len(rows) - 1
            first_open = max(first_open, len(rows) - max_open)
        rows[target].append(i)
        room[target] -= n
        slots[target] -= c
    return rows


def prompt_row(example: PromptExample, length: int, pad_id: int, side: str = "left") -> dict[str, np.ndarray]:
    """One prompt padded to `length`: tokens, positions, segment_ids [length] and lengths [] (real tokens).

    Left padding (the default for PPO) makes every prompt end at the same column, so a fixed-shape
    sampler starts generating at index `length` for every row. Worked example, length 8, pad 0:
        ids [1, 5, 40, 7, 6]  ->  tokens      [0, 0, 0, 1, 5, 40, 7, 6]
                                  positions   [0, 0, 0, 0, 1,  2, 3, 4]
                                  segment_ids [0, 0, 0, 1, 1,  1, 1, 1]
                                  lengths     5
    """
    n = len(example.ids)
    if n > length:
        raise ValueError(f"prompt of {n} tokens is longer than {length}")
    span = slice(length - n, length) if side == "left" else slice(0, n)
    tokens = np.full((length,), pad_id, np.int32)
    positions = np.zeros((length,), np.int32)
    segment_ids = np.zeros((length,), np.int32)
    tokens[span], positions[span], segment_ids[span] = example.ids, np.arange(n), 1
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "lengths": np.int32(n)}


def ranking_row(example: RankingExample, k_slots: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """K response sequences, each right-padded on its own line: [K, T] arrays plus ranks [K], lengths [K].

    Unlike LM rows, `tokens` holds every id, including the final end-of-turn token, because the
    reward model reads its score at that token: index lengths[k] - 1. targets/loss_mask follow
    the LM convention (the last real position has no next token: target pad, mask 0), so an
    auxiliary LM loss on answers is possible. Empty slots (k >= K of this example) have ranks 0,
    lengths 0 and all-padding lines. Worked example, K slots 3, T = 6, pad 0, two responses:
        r0: ids [1, 5, 40, 6, 41, 7]  weights [0, 0, 0, 0, 1, 1]   rank 1
        r1: ids [1, 5, 40, 6, 7]      weights [0, 0, 0, 0, 1]      rank 2 (an empty answer)
        tokens      [[1, 5, 40, 6, 41, 7], [1, 5, 40, 6, 7, 0], [0, 0, 0, 0, 0, 0]]
        targets     [[5, 40, 6, 41, 7, 0], [5, 40, 6, 7, 0, 0], [0, 0, 0, 0, 0, 0]]
        loss_mask   [[0, 0, 0, 1, 1, 0],   [0, 0, 0, 1, 0, 0],  [0, 0, 0, 0, 0, 0]]
        segment_ids [[1, 1, 1, 1, 1, 1],   [1, 1, 1, 1, 1, 0],  [0, 0, 0, 0, 0, 0]]
        ranks [1, 2, 0]     lengths [6, 5, 0]
    """
    if example.k > k_slots:
        raise ValueError(f"example has {example.k} responses, the batch has {k_slots} slots")
    row = _empty_row((k_slots, seq_len), pad_id)
    ranks = np.zeros((k_slots,), np.int32)
    lengths = np.zeros((k_slots,), np.int32)
    for k, (ex, rank) in enumerate(zip(example.responses, example.ranks)):
        n = len(ex.ids)
        if n > seq_len:
            raise ValueError(f"response sequence of {n} tokens is longer than {seq_len}")
        row["tokens"][k, :n] = ex.ids
        row["targets"][k, :n - 1] = ex.ids[1:]
        row["loss_mask"][k, :n - 1] = ex.weights[1:]
        row["positions"][k, :n] = np.arange(n)
        row["segment_ids"][k, :n] = 1
        ranks[k], lengths[k] = rank, n
    return {**row, "ranks": ranks, "lengths": lengths}


def stack_rows(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Rows (dicts of arrays) -> one batch dict with a leading batch axis."""
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
