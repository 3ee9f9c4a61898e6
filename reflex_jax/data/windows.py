"""Where training windows start, and which tokens they can reach.

A training window is seq_len + 1 tokens of a split's stream: its first seq_len tokens are the inputs,
its last seq_len the targets. For template data a window starts at every row start and, inside a row
longer than a window, every seq_len tokens after it: consecutive windows of a long row overlap by one
token, so every token of a row after its first is the target of some window, whatever the block
size. The pieces that `prepare(long_rows="split")` cut a row into count as one row again here. For
.txt data a window starts at any token. The starts depend only on the prepared files and seq_len, so
the batch at a step stays a pure function of (seed, step) (see loader.py).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .store import TokenData


def row_starts(data: TokenData, split: str) -> np.ndarray:
    """int64 start of each row in the stream; the pieces of a split row (consecutive rows of one
    source row) as one row."""
    starts = data.offsets(split)[:-1]
    if (data.meta.get("long_rows") or {}).get("policy") == "split" and len(starts) > 1:
        src = data.source_rows(split)
        starts = starts[np.concatenate([[True], src[1:] != src[:-1]])]
    return starts


def train_starts(data: TokenData, split: str, seq_len: int) -> Optional[np.ndarray]:
    """Sorted int64 window starts of template data (None for text: windows start at any token).

    A row of L tokens has ceil((L - 1) / seq_len) starts (at least one), seq_len apart, so its last
    window reaches its last token."""
    if data.kind != "rows":
        return None
    a = row_starts(data, split)
    lengths = np.diff(np.append(a, data.offsets(split)[-1]))
    count = np.maximum(1, -(-(lengths - 1) // seq_len))
    if count.max(initial=1) == 1:
        return a  # no row longer than a window: the starts are the row starts
    first = np.repeat(np.cumsum(count) - count, count)
    return np.repeat(a, count) + (np.arange(first.size) - first) * seq_len


def uncovered(starts: np.ndarray, seq_len: int, n: int, mask) -> tuple[int, int]:
    """(tokens, answer tokens) of a stream of n tokens that no window at `starts` (sorted) has as a
    target; a window runs on past the end of the stream into its start.

    Window s has targets s+1 .. s+seq_len; the next window t adds t+1 ..; so s+seq_len+1 .. t are
    nobody's target (windows before s end earlier)."""
    nxt = np.append(starts[1:], starts[0] + n)  # the first window again, after wrapping
    lo, hi = starts + seq_len + 1, nxt + 1
    gap = hi > lo
    lo, hi = lo[gap], hi[gap]
    single = hi - lo == 1
    answer = int(np.count_nonzero(np.asarray(mask[lo[single] % n]))) if single.any() else 0
    for a, b in zip(lo[~single].tolist(), hi[~single].tolist()):  # only where windows skip tokens
        for x, y in ((a, min(b, n)), (max(a, n) - n, b - n)):
            if y > x:
                answer += int(np.count_nonzero(mask[x:y]))
    return int((hi - lo).sum()), answer


def window_reach(data: TokenData, split: str, seq_len: int,
                 starts: Optional[np.ndarray] = None) -> dict:
    """How many rows of a split are longer than a window of seq_len + 1 tokens, and how many
    (answer) tokens no window reaches as a target: the training loader's windows, or `starts`."""
    info = data.meta["splits"][split]
    mask = data.mask(split)
    answer = info.get("answer_tokens")
    reach = {"split": split, "window": seq_len + 1, "kind": data.kind,
             "answer_tokens": int(np.count_nonzero(mask)) if answer is None else int(answer)}
    if data.kind != "rows" and starts is None:
        return {**reach, "rows": None, "long_rows": 0, "longest": None, "unreachable_tokens": 0,
                "unreachable_answer_tokens": 0}
    rows = row_starts(data, split)
    lengths = np.diff(np.append(rows, data.offsets(split)[-1]))
    if starts is None:
        starts = train_starts(data, split, seq_len)
    tokens, answer_tokens = uncovered(np.asarray(starts, np.int64), seq_len, len(mask), mask)
    return {**reach, "rows": int(len(rows)), "long_rows": int((lengths > seq_len + 1).sum()),
            "longest": int(lengths.max(initial=0)), "unreachable_tokens": tokens,
            "unreachable_answer_tokens": answer_tokens}


def share(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({100 * part / max(whole, 1):.1f}%)"


def reach_summary(reach: dict, meta: Optional[dict] = None) -> str:
    """One line on a split's windows: long rows, and answer tokens out of reach (with `meta`, also
    the rows prepare dropped as too long)."""
    split, window = reach["split"], reach["window"]
    lost = share(reach["unreachable_answer_tokens"], reach["answer_tokens"])
    if reach["kind"] != "rows":
        line = f"{split}: text windows start at any token, so answer tokens out of reach: {lost}"
    elif reach["long_rows"]:
        line = (f"{split}: {reach['long_rows']:,} of {reach['rows']:,} rows are longer than the "
                f"{window:,}-token window (the longest {reach['longest']:,}), and windows start inside "
                f"them every {window - 1:,} tokens, so answer tokens out of reach: {lost}")
    else:
        line = f"{split}: every row fits the {window:,}-token window; answer tokens out of reach: {lost}"
    long_rows, lengths = (meta or {}).get("long_rows") or {}, (meta or {}).get("row_lengths") or {}
    if long_rows.get("policy") == "drop" and long_rows.get("rows"):
        line += (f"; prepare dropped {long_rows['rows']:,} rows over {long_rows['max_tokens']:,} "
                 f"tokens, with {lengths.get('dropped_answer_tokens', 0):,} answer tokens")
    return line
