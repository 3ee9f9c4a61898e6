"""Writing prepared directories: the split stream writer, copying rows between splits, and
publishing a finished temporary directory in one step."""
from __future__ import annotations

import array
import hashlib
import json
import os
import tempfile

import numpy as np

from .store import SPLIT_FILES, read_meta, split_path

_COPY_CHUNK = 1 << 22  # tokens per read when copying rows into the train/val files


class StreamWriter:
    """Appends rows to one split's token and mask files; offsets and source rows are kept in memory
    (8 bytes per row each, as array('q')) and saved on close."""

    def __init__(self, directory: str, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self._tokens = open(split_path(directory, split, "tokens.bin"), "wb")
        self._mask = open(split_path(directory, split, "mask.bin"), "wb")
        self.offsets, self.source_rows = array.array("q", [0]), array.array("q")
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.answer_tokens = 0

    @property
    def rows(self) -> int:
        return len(self.source_rows)

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(self, ids: np.ndarray, mask: np.ndarray, source_row: int) -> None:
        self._buf.append((ids.astype(self.dtype), mask.astype(np.uint8)))  # small until written
        self._buffered += len(ids)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.source_rows.append(source_row)
        if self._buffered >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            np.concatenate([b[0] for b in self._buf]).tofile(self._tokens)
            mask = np.concatenate([b[1] for b in self._buf])
            mask.tofile(self._mask)
            self.answer_tokens += int(mask.sum())
        self._buf, self._buffered = [], 0

    def close(self) -> dict:
        self._flush()
        self._tokens.close()
        self._mask.close()
        np.save(split_path(self.directory, self.split, "offsets.npy"), np.asarray(self.offsets, np.int64))
        np.save(split_path(self.directory, self.split, "source_rows.npy"),
                np.asarray(self.source_rows, np.int64))
        return {"rows": self.rows, "tokens": self.tokens, "answer_tokens": self.answer_tokens}


def fingerprint(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()


def copy_rows(src_dir: str, src: str, dst_dir: str, dst: str, rows: np.ndarray, dtype) -> dict:
    """Write the given (sorted) rows of split `src` as split `dst`, copying runs of consecutive rows
    in bounded chunks (plain reads, not a memory map, so resident memory stays at one chunk)."""
    assert len(rows), "callers only copy non-empty splits"
    offsets = np.load(split_path(src_dir, src, "offsets.npy"))
    source_rows = np.load(split_path(src_dir, src, "source_rows.npy"))
    answer = 0
    with open(split_path(src_dir, src, "tokens.bin"), "rb") as st, \
            open(split_path(src_dir, src, "mask.bin"), "rb") as sm, \
            open(split_path(dst_dir, dst, "tokens.bin"), "wb") as dt, \
            open(split_path(dst_dir, dst, "mask.bin"), "wb") as dm:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(rows, breaks):
            a, b = int(offsets[run[0]]), int(offsets[run[-1] + 1])
            for c in range(a, b, _COPY_CHUNK):
                n = min(b, c + _COPY_CHUNK) - c
                st.seek(c * dtype.itemsize)
                dt.write(st.read(n * dtype.itemsize))
                sm.seek(c)
                m = sm.read(n)
                dm.write(m)
                answer += int(np.frombuffer(m, np.uint8).sum())
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(split_path(dst_dir, dst, "offsets.npy"), new_offsets)
    np.save(split_path(dst_dir, dst, "source_rows.npy"), source_rows[rows])
    return {"rows": int(len(rows)), "tokens": int(new_offsets[-1]), "answer_tokens": answer}


def remove_split(directory: str, split: str) -> None:
    for what in SPLIT_FILES:
        os.remove(split_path(directory, split, what))


def publish(tmp_dir: str, out_dir: str, meta: dict) -> None:
    """Move finished files into out_dir, meta.json last: a directory with meta.json is complete, and
    concurrent writers of the same data (several processes) only ever replace whole files."""
    os.makedirs(out_dir, exist_ok=True)
    old = read_meta(out_dir)
    if old is not None and old.get("fingerprint") != meta.get("fingerprint"):
        os.remove(os.path.join(out_dir, "meta.json"))  # never pair an old meta with new token files
    for split in ("train", "val"):
        for what in SPLIT_FILES:
            src = split_path(tmp_dir, split, what)
            if os.path.exists(src):
                os.replace(src, split_path(out_dir, split, what))
            elif split not in meta["splits"] and os.path.exists(split_path(out_dir, split, what)):
                os.remove(split_path(out_dir, split, what))  # stale file of an earlier preparation
    with open(os.path.join(tmp_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1, default=list)  # tuples of task options
    os.replace(os.path.join(tmp_dir, "meta.json"), os.path.join(out_dir, "meta.json"))


def make_tmp_dir(out_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # same filesystem as out_dir so that os.replace is a rename
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
