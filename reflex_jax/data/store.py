"""The prepared format on disk, and reading it back.

A prepared directory holds, per split (`train`, `val`):
    {split}.tokens.bin       all rows, each bos + template(row) + eos, concatenated
                             (uint16, uint32 if ids > 65535)
    {split}.mask.bin         uint8, 1 on the answer's tokens and the closing eos (all 1 for .txt documents)
    {split}.offsets.npy      int64 [rows + 1], where each row starts in the stream
    {split}.source_rows.npy  int64 [rows], the row's index in the source (checks, debugging)
and meta.json (tokenizer, special ids, template, source fingerprint, split sizes and largest token
id, skipped rows by reason, row lengths). A directory with a meta.json is complete: meta.json is
written last.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from ..errors import DataError, MissingFileError
from .tasks import get_task

FORMAT_VERSION = 1
SPLIT_FILES = ("tokens.bin", "mask.bin", "offsets.npy", "source_rows.npy")
_SCAN_CHUNK = 1 << 24  # tokens per np.max when scanning a token file


def split_path(directory: str, split: str, what: str) -> str:
    return os.path.join(directory, f"{split}.{what}")


def read_data_meta(directory: str) -> Optional[dict]:
    """meta.json of a prepared directory (local or in a bucket), or None where there is none (or
    it is unreadable)."""
    from .. import storage
    path = storage.join(directory, "meta.json")
    try:
        if storage.is_remote(directory):
            return json.loads(storage.read_text(path)) if storage.exists(path) else None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


class TokenData:
    """An opened prepared directory: meta plus memory-mapped token/mask files per split."""

    def __init__(self, directory: str, meta: dict, files: Optional[str] = None):
        # `directory` names the data (in messages and runs); `files` holds them on this host
        # (differs for a directory in a bucket: see `open`)
        self.directory, self.meta = directory, meta
        self._files = files or directory
        self.vocab_size: int = meta["vocab_size"]
        self.bos_id, self.eos_id, self.pad_id = meta["bos_id"], meta["eos_id"], meta["pad_id"]
        self.kind: str = meta["kind"]
        self.dtype = np.dtype(meta["dtype"])
        self._cache: dict = {}

    @classmethod
    def open(cls, directory: str) -> "TokenData":
        """A prepared directory on this host, or in a bucket (gs://...): then the small files are
        copied to this host's cache and the token and mask files are read by range (ranged.py)."""
        from .. import storage
        if storage.is_remote(directory):
            return cls._open_remote(storage.resolve(directory))
        hint = (f"prepare it with `python -m reflex_jax.data prepare --out {directory} ...` (or "
                "`... task`) first")
        if not os.path.isdir(directory):
            raise MissingFileError(f"prepared data directory {directory!r} does not exist; {hint}.")
        if not os.path.exists(os.path.join(directory, "meta.json")):
            raise MissingFileError(f"{directory!r} is not a prepared data directory (no meta.json); "
                                   f"{hint}.")
        meta = read_data_meta(directory)
        if meta is None or meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{directory!r} has an unreadable meta.json or one from another format "
                            f"version (want {FORMAT_VERSION}); {hint} again.")
        data = cls(directory, meta)
        for split, info in meta["splits"].items():
            for what, itemsize in (("tokens.bin", data.dtype.itemsize), ("mask.bin", 1)):
                path = split_path(directory, split, what)
                size = os.path.getsize(path) if os.path.exists(path) else -1
                if size != info["tokens"] * itemsize:
                    raise DataError(f"{path!r} is missing or has the wrong size for "
                                    f"{info['tokens']:,} tokens; {hint} again.")
        return data

    @classmethod
    def _open_remote(cls, remote: str) -> "TokenData":
        from .. import storage
        from .ranged import local_files
        local = local_files(remote)
        meta = read_data_meta(local)
        if meta is None or meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{remote!r} has an unreadable meta.json or one from another format "
                            f"version (want {FORMAT_VERSION}); prepare it again.")
        data = cls(remote, meta, files=local)
        for split, info in meta["splits"].items():
            for what, itemsize in (("tokens.bin", data.dtype.itemsize), ("mask.bin", 1)):
                path = storage.join(remote, f"{split}.{what}")
                got = storage.size(path) if storage.exists(path) else -1
                if got != info["tokens"] * itemsize:
                    raise DataError(f"{path!r} is missing or has the wrong size for "
                                    f"{info['tokens']:,} tokens; prepare {remote!r} again.")
        return data

    @property
    def remote(self) -> bool:
        """Whether the token and mask files are read by range from a bucket."""
        return self._files != self.directory

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def _check_split(self, name: str) -> None:
        if name not in self.meta["splits"]:
            raise DataError(f"split {name!r} is not in {self.directory!r} (it has "
                            f"{', '.join(self.splits)}); prepare with --val_fraction > 0 for a val split.")

    def _get(self, name: str, what: str):
        self._check_split(name)
        key = (name, what)
        if key not in self._cache:
            path = split_path(self._files, name, what)
            if self.remote and what.endswith(".bin"):
                from .. import storage
                from .ranged import RangedArray
                self._cache[key] = RangedArray(
                    storage.join(self.directory, f"{name}.{what}"),
                    self.dtype if what == "tokens.bin" else np.uint8,
                    self.meta["splits"][name]["tokens"],
                    os.path.join(self._files, "chunks", f"{name}.{what}"))
            elif what == "tokens.bin":
                self._cache[key] = np.memmap(path, self.dtype, "r")
            elif what == "mask.bin":
                self._cache[key] = np.memmap(path, np.uint8, "r")
            else:
                self._cache[key] = np.load(path)
        return self._cache[key]

    def split(self, name: str) -> np.memmap:
        """The token stream of a split."""
        return self._get(name, "tokens.bin")

    def mask(self, name: str) -> np.memmap:
        """1 where the token is an answer token (or any token of a .txt document)."""
        return self._get(name, "mask.bin")

    def offsets(self, name: str) -> np.ndarray:
        """int64 [rows + 1]: row starts in the stream, then its length."""
        return self._get(name, "offsets.npy")

    def source_rows(self, name: str) -> np.ndarray:
        return self._get(name, "source_rows.npy")

    def max_id(self, name: str) -> int:
        """The largest token id in a split's token file (-1 if empty), read from the file itself in
        chunks (about 1 ms per 10M tokens from the page cache), cached."""
        key = (name, "max_id")
        recorded = self.meta["splits"][name].get("max_id")
        if self.remote and recorded is not None:  # reading every chunk would defeat ranged reads
            return int(recorded)
        if key not in self._cache:
            tokens = self.split(name)
            self._cache[key] = max([-1] + [int(tokens[c:c + _SCAN_CHUNK].max())
                                           for c in range(0, len(tokens), _SCAN_CHUNK)])
        return self._cache[key]

    def first_at_least(self, name: str, token_id: int) -> tuple[int, int]:
        """(row, position in the stream) of the first token >= token_id; (-1, -1) if none."""
        tokens = self.split(name)
        for c in range(0, len(tokens), _SCAN_CHUNK):
            hits = np.flatnonzero(tokens[c:c + _SCAN_CHUNK] >= token_id)
            if hits.size:
                pos = c + int(hits[0])
                row = int(np.searchsorted(self.offsets(name), pos, side="right")) - 1
                return row, pos
        return -1, -1

    def rows(self, name: str, start: int = 0, stop: Optional[int] = None):
        """(tokens, mask) of rows start..stop of a split, each as its own array."""
        off = self.offsets(name)
        tokens, mask = self.split(name), self.mask(name)
        return [(np.asarray(tokens[off[i]:off[i + 1]]), np.asarray(mask[off[i]:off[i + 1]]))
                for i in range(start, len(off) - 1 if stop is None else stop)]

    def tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self.meta["tokenizer"])


def task_val_rows(meta: dict) -> list[dict]:
    """The validation rows (question/answer) of a directory prepare_task made, regenerated from its
    meta exactly as they were drawn (for exact-match evaluation)."""
    if not meta.get("task"):
        raise DataError("this prepared directory was not made by prepare_task, so it has no task rows; "
                        "use a built-in task (data.task) for exact-match evaluation.")
    n_val = meta["splits"].get("val", {}).get("rows", 0)
    return get_task(meta["task"]).rows(n_val, f"{meta['seed']}-val", **meta["source"]["options"])
