"""Writing prepared directories: the split stream writer, copying rows between splits, and
publishing a finished temporary directory in one step.

Every write goes through `write_all`, so a full disk, a quota, a read-only or size-limited file
system ends in `WriteFailed` (naming the file and the bytes of the write), never in a half-written
directory that reads as prepared: files go to a temporary directory first, and meta.json, written
last, is what makes a directory prepared.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import tempfile
from typing import Optional

import numpy as np

from .. import storage
from ..errors import DataError
from .store import SPLIT_FILES, read_data_meta, split_path

_COPY_CHUNK = 1 << 22  # tokens per read when copying rows into the train/val files


class WriteFailed(DataError):
    """A write into a prepared directory (or its temporary copy) failed; prepare() turns it into a
    sentence about the output directory."""

    def __init__(self, path: str, nbytes: Optional[int], error: OSError, partly_published: bool = False):
        self.path, self.nbytes, self.reason = path, nbytes, error.strerror or str(error)
        self.partly_published = partly_published  # out_dir had files replaced, or its meta removed
        what = f"write {nbytes:,} bytes to" if nbytes is not None else "create or move"
        super().__init__(f"could not {what} {path!r} ({self.reason}); free space there or write "
                         "elsewhere.")


def write_all(f, data, path: str) -> None:
    """Write every byte of `data` to the unbuffered file `f` (a raw write may be partial)."""
    view = memoryview(data).cast("B")
    try:
        while view.nbytes:
            view = view[f.write(view):]
    except OSError as e:
        raise WriteFailed(path, memoryview(data).nbytes, e) from None


def open_output(path: str):
    """An unbuffered file for writing: each write reaches the disk or fails right there."""
    try:
        return open(path, "wb", buffering=0)
    except OSError as e:
        raise WriteFailed(path, None, e) from None


def save_array(path: str, values: np.ndarray) -> None:
    """np.save, with a failed write turned into WriteFailed."""
    try:
        with open(path, "wb") as f:
            np.save(f, values)
    except OSError as e:
        raise WriteFailed(path, int(values.nbytes) + 128, e) from None


class StreamWriter:
    """Appends rows to one split's token and mask files; offsets and source rows are kept in memory
    (8 bytes per row each, as array('q')) and saved on close."""

    def __init__(self, directory: str, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self._paths = (split_path(directory, split, "tokens.bin"), split_path(directory, split, "mask.bin"))
        self._tokens, self._mask = open_output(self._paths[0]), open_output(self._paths[1])
        self.offsets, self.source_rows = array.array("q", [0]), array.array("q")
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.answer_tokens = 0
        self.max_id = -1

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
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        if self._buffered >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            write_all(self._tokens, np.concatenate([b[0] for b in self._buf]), self._paths[0])
            mask = np.concatenate([b[1] for b in self._buf])
            write_all(self._mask, mask, self._paths[1])
            self.answer_tokens += int(mask.sum())
        self._buf, self._buffered = [], 0

    def close(self) -> dict:
        try:
            self._flush()
        finally:
            self._tokens.close()
            self._mask.close()
        save_array(split_path(self.directory, self.split, "offsets.npy"), np.asarray(self.offsets, np.int64))
        save_array(split_path(self.directory, self.split, "source_rows.npy"),
                   np.asarray(self.source_rows, np.int64))
        return {"rows": self.rows, "tokens": self.tokens, "answer_tokens": self.answer_tokens,
                "max_id": self.max_id}


def fingerprint(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()


def copy_rows(src_dir: str, src: str, dst_dir: str, dst: str, rows: np.ndarray, dtype) -> dict:
    """Write the given (sorted) rows of split `src` as split `dst`, copying runs of consecutive rows
    in bounded chunks (plain reads, not a memory map, so resident memory stays at one chunk)."""
    assert len(rows), "callers only copy non-empty splits"
    offsets = np.load(split_path(src_dir, src, "offsets.npy"))
    source_rows = np.load(split_path(src_dir, src, "source_rows.npy"))
    answer, max_id = 0, -1
    dt_path, dm_path = split_path(dst_dir, dst, "tokens.bin"), split_path(dst_dir, dst, "mask.bin")
    with open(split_path(src_dir, src, "tokens.bin"), "rb") as st, \
            open(split_path(src_dir, src, "mask.bin"), "rb") as sm, \
            open_output(dt_path) as dt, open_output(dm_path) as dm:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(rows, breaks):
            a, b = int(offsets[run[0]]), int(offsets[run[-1] + 1])
            for c in range(a, b, _COPY_CHUNK):
                n = min(b, c + _COPY_CHUNK) - c
                st.seek(c * dtype.itemsize)
                t = st.read(n * dtype.itemsize)
                write_all(dt, t, dt_path)
                if n:
                    max_id = max(max_id, int(np.frombuffer(t, dtype).max()))
                sm.seek(c)
                m = sm.read(n)
                write_all(dm, m, dm_path)
                answer += int(np.frombuffer(m, np.uint8).sum())
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    save_array(split_path(dst_dir, dst, "offsets.npy"), new_offsets)
    save_array(split_path(dst_dir, dst, "source_rows.npy"), source_rows[rows])
    return {"rows": int(len(rows)), "tokens": int(new_offsets[-1]), "answer_tokens": answer,
            "max_id": max_id}


def remove_split(directory: str, split: str) -> None:
    for what in SPLIT_FILES:
        os.remove(split_path(directory, split, what))


def publish(tmp_dir: str, out_dir: str, meta: dict) -> None:
    """Move finished files into out_dir, meta.json last: a directory with meta.json is complete, and
    concurrent writers of the same data (several processes) only ever replace whole files.

    meta.json is written into tmp_dir before anything moves, so a full disk stops here with out_dir
    untouched; after that only renames on one file system remain."""
    meta_tmp = os.path.join(tmp_dir, "meta.json")
    text = json.dumps(meta, ensure_ascii=False, indent=1, default=list)  # tuples of task options
    with open_output(meta_tmp) as f:
        write_all(f, text.encode("utf-8"), meta_tmp)
    if storage.is_remote(out_dir):
        _upload(tmp_dir, out_dir, meta)
        return
    touched = False
    try:
        os.makedirs(out_dir, exist_ok=True)
        old = read_data_meta(out_dir)
        touched = True
        if old is not None and old.get("fingerprint") != meta.get("fingerprint"):
            os.remove(os.path.join(out_dir, "meta.json"))  # never pair an old meta with new token files
        for split in ("train", "val"):
            for what in SPLIT_FILES:
                src = split_path(tmp_dir, split, what)
                if os.path.exists(src):
                    os.replace(src, split_path(out_dir, split, what))
                elif split not in meta["splits"] and os.path.exists(split_path(out_dir, split, what)):
                    os.remove(split_path(out_dir, split, what))  # stale file of an earlier preparation
        os.replace(meta_tmp, os.path.join(out_dir, "meta.json"))
    except OSError as e:
        raise WriteFailed(out_dir, None, e, partly_published=touched) from None


def _upload(tmp_dir: str, out_dir: str, meta: dict) -> None:
    """publish() into a bucket: its meta.json removed first (a reader never pairs it with new
    token files), the split files uploaded, stale ones of an earlier preparation removed, meta.json
    uploaded last."""
    storage.remove(storage.join(out_dir, "meta.json"))
    for split in ("train", "val"):
        for what in SPLIT_FILES:
            if split not in meta["splits"]:
                storage.remove(storage.join(out_dir, f"{split}.{what}"))
    storage.upload_dir(tmp_dir, out_dir, last="meta.json")


def make_tmp_dir(out_dir: str) -> str:
    """A temporary directory on the file system of out_dir (so that publishing is a rename); for a
    bucket, in this host's cache."""
    if storage.is_remote(out_dir):
        parent = os.path.dirname(storage.local_cache_dir(out_dir))
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix="prepare.tmp-", dir=parent)
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        # same filesystem as out_dir so that os.replace is a rename
        return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    except OSError as e:
        raise WriteFailed(parent, None, e) from None
