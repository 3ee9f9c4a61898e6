"""A prepared directory's token and mask files in a bucket, read by range.

A training host reads only the windows of its own rows: a `RangedArray` stands where the local
format has an np.memmap, and fetches the fixed-size chunks that a slice touches with one ranged
request each. Fetched chunks are kept in the host's cache directory (written whole, then renamed,
so a stopped run never leaves half a chunk), so a resumed run or a second epoch reads them from
the local disk; the few most recent ones are also kept in memory. The cache belongs to one
meta.json: the directory prepared again (another meta.json) starts a fresh cache.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Optional

import numpy as np

from .. import storage
from ..errors import DataError

CHUNK_BYTES = 4 << 20  # one request per 4 MiB: a few hundred 2048-token windows of uint16
_IN_MEMORY = 16        # chunks kept in memory per file


class RangedArray:
    """A read-only 1-D array of `length` items of `dtype` in the remote file `url`: slices, integer
    indices and integer index arrays, each returning a NumPy array (or scalar)."""

    ndim = 1

    def __init__(self, url: str, dtype, length: int, cache_dir: str,
                 chunk_bytes: Optional[int] = None):
        self.url, self.dtype, self.cache_dir = url, np.dtype(dtype), cache_dir
        self._n = int(length)
        self.chunk_items = max(1, (chunk_bytes or CHUNK_BYTES) // self.dtype.itemsize)
        self.fetched_bytes = 0  # read from the bucket (the cache's misses)
        self._memory: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and the eval pass both read
        os.makedirs(cache_dir, exist_ok=True)

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple:
        return (self._n,)

    def __array__(self, dtype=None, copy=None):
        out = self._range(0, self._n)
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self._n if key < 0 else 0)
            if not 0 <= i < self._n:
                raise IndexError(f"index {int(key)} is out of range for {self._n} items")
            return self._range(i, i + 1)[0]
        index = np.asarray(key)
        if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
            raise TypeError("a RangedArray takes slices, integers and integer index arrays")
        flat = np.where(index < 0, index + self._n, index).reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self._n):
            raise IndexError(f"an index is out of range for {self._n} items")
        out = np.empty(flat.shape, self.dtype)
        which = flat // self.chunk_items
        for c in np.unique(which).tolist():
            hit = which == c
            out[hit] = self._chunk(c)[flat[hit] - c * self.chunk_items]
        return out.reshape(index.shape)

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, self.dtype)
        first, last = start // self.chunk_items, (stop - 1) // self.chunk_items
        parts = [self._chunk(c) for c in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offset = first * self.chunk_items
        return joined[start - offset:stop - offset]

    def _chunk(self, c: int) -> np.ndarray:
        with self._lock:
            if c in self._memory:
                self._memory.move_to_end(c)
                return self._memory[c]
            chunk = self._load(c)
            self._memory[c] = chunk
            if len(self._memory) > _IN_MEMORY:
                self._memory.popitem(last=False)
            return chunk

    def _load(self, c: int) -> np.ndarray:
        start = c * self.chunk_items
        count = min(self.chunk_items, self._n - start)
        path = os.path.join(self.cache_dir, f"{c}.chunk")
        want = count * self.dtype.itemsize
        if os.path.exists(path) and os.path.getsize(path) == want:
            return np.fromfile(path, self.dtype)
        data = storage.read_range(self.url, start * self.dtype.itemsize,
                                  start * self.dtype.itemsize + want)
        if len(data) != want:
            raise DataError(f"{self.url!r} ended {want - len(data):,} bytes early in chunk {c}; "
                            "the file was changed or cut after it was prepared, so prepare the "
                            "directory again.")
        self.fetched_bytes += want
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return np.frombuffer(data, self.dtype)


def local_files(remote: str) -> str:
    """This host's cache of the prepared directory `remote`, one per meta.json (named by its
    hash): meta.json and the small per-row files (offsets, source rows) copied whole; the token
    and mask files' chunks go in `chunks/` as they are read. Processes of one host share it: every
    file is written under a temporary name and renamed. Caches of other meta.json are removed."""
    import hashlib
    import shutil
    meta = storage.join(remote, "meta.json")
    if not storage.exists(meta):
        raise DataError(f"data directory {remote!r} holds no meta.json; prepare it with "
                        f"`python -m reflex_jax.data prepare --out {remote} ...` (or prepare "
                        "locally and copy the directory there).")
    text = storage.read_text(meta)
    root = storage.local_cache_dir(remote)
    local = os.path.join(root, hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])
    if os.path.exists(os.path.join(local, "meta.json")):
        return local
    os.makedirs(local, exist_ok=True)
    for name in os.listdir(root):  # another preparation's cache
        other = os.path.join(root, name)
        if other != local:
            shutil.rmtree(other, ignore_errors=True) if os.path.isdir(other) else os.remove(other)
    files = [n for n in storage.listdir(remote) if n.endswith(".npy")]
    for name, data in [(n, storage.read_bytes(storage.join(remote, n))) for n in files] + [
            ("meta.json", text.encode("utf-8"))]:  # meta.json last: it marks the cache whole
        tmp = os.path.join(local, f"{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(local, name))
    return local
