"""Documents inside packed windows: the segment id and the position of every token.

A window (training or validation) runs on across document boundaries. A document is a row for
template data (the pieces of a `--long_rows split` row count as one row) and a file for `.txt`
data; the end of a split, where a training window wraps around to the start, is a boundary too.
With `data.document_mask` the batches carry, beside the tokens:

* `segment_ids` int32 [B, L]: 0 for the window's first document, +1 at every document start inside
  it, so that a token attends only to earlier tokens with its own id;
* `positions` int32 [B, L]: 0 at each document start (and at the window's first token, which may lie
  inside a document), +1 per token after it.

The token windows themselves are the same with the switch on or off.
"""
from __future__ import annotations

import numpy as np

from .store import TokenData
from .windows import row_starts


def document_starts(data: TokenData, split: str) -> np.ndarray:
    """int64 stream position where each document of the split starts (sorted, the first is 0)."""
    return row_starts(data, split)


def window_documents(stream_index_BL: np.ndarray, starts: np.ndarray) -> dict:
    """{"segment_ids", "positions"} (int32 [B, L]) of windows reading the stream at
    `stream_index_BL`: a new document wherever the document changes or the index does not follow
    the previous one (the wrap from the end of a split to its start)."""
    idx = np.asarray(stream_index_BL, np.int64)
    doc = np.searchsorted(starts, idx, side="right") - 1
    new = np.ones(idx.shape, bool)
    new[:, 1:] = (doc[:, 1:] != doc[:, :-1]) | (idx[:, 1:] != idx[:, :-1] + 1)
    return _fields(new)


def _fields(new_BL: np.ndarray) -> dict:
    """segment ids and positions from the document starts `new_BL` (True at each start; the first
    slot of a row always starts one)."""
    t = np.arange(new_BL.shape[1])
    segment_ids = np.cumsum(new_BL, axis=1) - 1
    start_BL = np.maximum.accumulate(np.where(new_BL, t, 0), axis=1)
    return {"segment_ids": segment_ids.astype(np.int32), "positions": (t - start_BL).astype(np.int32)}


def packed_documents(lengths_BD, length: int) -> dict:
    """{"segment_ids", "positions"} [B, length] of rows holding documents of the given lengths one
    after the other (row b: lengths_BD[b]); slots after the last document form one more document
    (padding). For validation batches and for building packed batches by hand."""
    new = np.zeros((len(lengths_BD), length), bool)
    new[:, 0] = True
    for b, lengths in enumerate(lengths_BD):
        at = np.cumsum([0] + [int(n) for n in lengths])
        new[b, at[at < length]] = True
    return _fields(new)
