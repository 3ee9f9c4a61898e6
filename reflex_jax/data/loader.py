"""Batches from a prepared directory.

The training loader draws windows of seq_len + 1 tokens that start at one of the starts of
windows.train_starts (every row start, and every seq_len tokens inside a row longer than a window),
chosen by np.random.default_rng([seed, step]), and run on into the following rows (packing); a window
that runs past the end of the split wraps around to its start. For .txt data a window starts at any
token. So the global batch at a step is a pure function of (seed, step) and the prepared files,
whatever the number of processes. With `documents`, batches also carry each token's document
(segment id) and its position in it (documents.py).
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .checks import check_int
from .documents import document_starts, window_documents
from .store import TokenData
from .windows import reach_summary, train_starts, window_reach


def window(stream: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` items from `start`, wrapping around the end of the stream."""
    n = len(stream)
    if start + length <= n:
        return np.asarray(stream[start:start + length])
    return np.asarray(stream[(start + np.arange(length)) % n])


class BatchLoader:
    """Training batches: the global batch at a step is a pure function of (seed, step).

    Window starts come from np.random.default_rng([seed, step]): for template data row starts and
    starts inside long rows (windows.py), any token for .txt data. Each process reads only its slice
    [pi*b, (pi+1)*b) of the global batch. `reach` says how many rows are longer than a window and
    how many answer tokens no window reaches (0 by construction); `summary()` says it in one line.
    `documents`: batches add `segment_ids` and `positions` (data.document_mask), same windows.
    """

    def __init__(self, data: TokenData, split: str, batch_size: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1, documents: bool = False):
        for name, v, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0),
                             ("process_count", process_count, 1), ("process_index", process_index, 0)):
            check_int(name, v, low)
        if process_index >= process_count:
            raise ConfigError(f"process_index={process_index} must be below process_count={process_count}.")
        if batch_size % process_count:
            raise ConfigError(f"batch_size={batch_size} must be divisible by the process count "
                              f"{process_count}; pick a multiple of {process_count}.")
        self.data, self.split = data, split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.local_batch = batch_size // process_count
        self.process_index = process_index
        self.tokens, self.mask = data.split(split), data.mask(split)
        self.starts = train_starts(data, split, seq_len)
        self.reach = window_reach(data, split, seq_len, self.starts)
        self.document_starts = document_starts(data, split) if documents else None

    def summary(self) -> str:
        """One line: rows longer than the window, answer tokens out of reach (for the run's log)."""
        return reach_summary(self.reach, self.data.meta)

    def global_starts(self, step: int) -> np.ndarray:
        """Stream positions where the global batch's windows start (all processes agree)."""
        check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, int(step)])
        if self.starts is not None:
            return self.starts[rng.integers(0, len(self.starts), self.batch_size)]
        return rng.integers(0, len(self.tokens), self.batch_size)

    def batch(self, step: int) -> dict:
        """{"tokens": int32 [b, seq_len+1], "mask": float32 [b, seq_len+1]} (with `documents`, also
        int32 "segment_ids" and "positions"); b = batch_size / processes."""
        lo = self.process_index * self.local_batch
        starts = self.global_starts(step)[lo:lo + self.local_batch]
        length = self.seq_len + 1
        tokens_BT = np.stack([window(self.tokens, int(s), length) for s in starts]).astype(np.int32)
        mask_BT = np.stack([window(self.mask, int(s), length) for s in starts]).astype(np.float32)
        out = {"tokens": tokens_BT, "mask": mask_BT}
        if self.document_starts is not None:
            index_BT = (np.asarray(starts, np.int64)[:, None] + np.arange(length)) % len(self.tokens)
            out.update(window_documents(index_BT, self.document_starts))
        return out


def _val_windows(offsets: np.ndarray, seq_len: int, want: int) -> list[tuple[int, int]]:
    """[a, b) stream ranges of at most `want` windows of up to seq_len + 1 tokens: whole rows packed
    greedily from the first row, a row longer than a window split into windows that overlap the
    previous one by one token."""
    length = seq_len + 1
    windows: list[tuple[int, int]] = []
    cur = None
    for r in range(len(offsets) - 1):
        if len(windows) >= want:
            break
        a, b = int(offsets[r]), int(offsets[r + 1])
        if cur is not None and b - cur[0] <= length:
            cur = (cur[0], b)  # the row fits into the open window
            continue
        if cur is not None:
            windows.append(cur)
        while b - a > length:  # a long row: full windows, each overlapping the last by one token
            windows.append((a, a + length))
            a += seq_len
        cur = (a, b)
    if cur is not None:
        windows.append(cur)
    return windows[:want]


def val_batches(data: TokenData, batch_size: int, seq_len: int, n_batches: int,
                split: str = "val", documents: bool = False) -> list[dict]:
    """Fixed validation batches from the start of a split, each token a target at most once.

    Template data: whole rows packed greedily into windows that start at a row start (a row longer
    than a window continues in the next one), so answers keep their question. Text: consecutive
    windows. A window overlaps the previous by one token so no target is lost. Unused places hold
    pad_id with mask = valid = 0. At most n_batches (fewer if the split is small, at least 1).
    `documents`: each batch adds `segment_ids` and `positions` (documents.py).
    """
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("n_batches", n_batches)):
        check_int(name, v, 1)
    tokens, mask = data.split(split), data.mask(split)
    length = seq_len + 1
    offsets = data.offsets(split) if data.kind == "rows" else np.array([0, len(tokens)])
    windows = _val_windows(offsets, seq_len, n_batches * batch_size)
    starts = document_starts(data, split) if documents else None
    out = []
    for i in range(-(-len(windows) // batch_size)):
        tokens_BT = np.full((batch_size, length), data.pad_id, np.int32)
        mask_BT = np.zeros((batch_size, length), np.float32)
        valid_BT = np.zeros((batch_size, length), np.float32)
        index_BT = np.zeros((batch_size, length), np.int64)  # each slot's stream position
        for j, (a, b) in enumerate(windows[i * batch_size:(i + 1) * batch_size]):
            tokens_BT[j, :b - a] = tokens[a:b]
            mask_BT[j, :b - a] = mask[a:b]
            valid_BT[j, :b - a] = 1.0
            index_BT[j] = a + np.arange(length)
        batch = {"tokens": tokens_BT, "mask": mask_BT, "valid": valid_BT}
        if documents:
            # padding reads on past the window: whatever documents it falls into, only later
            # padding can see it
            batch.update(window_documents(index_BT, starts))
        out.append(batch)
    return out
