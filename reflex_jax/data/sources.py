"""Where rows come from: local files (.jsonl/.json/.parquet/.csv rows, .txt documents) or an HF hub
dataset. A row that cannot be parsed comes out as a BadRow (counted, not fatal); a source that
cannot be read at all raises one sentence."""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterator, NamedTuple, Optional, Union

from ..errors import DataError, MissingFileError
from .templates import BadRow

DEFAULT_SOURCE = "Den4ikAI/russian_instructions_2"
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class Source(NamedTuple):
    """An opened source: its kind ("rows" or "text"), the items, their count where known (for the
    progress bar), a fingerprint for meta.json, how to name it in messages, and the files skipped
    so far ({"path", "reason"}; filled as the items are read)."""
    kind: str
    items: Iterator[Any]
    total: Optional[int]
    fingerprint: dict
    described: str
    skipped_files: list


class SkippedFile(NamedTuple):
    """A file of a source directory that is not read, and why (the reason it is counted under)."""
    path: str
    reason: str


OUTSIDE = "outside_source_dir"  # a symlink in a source directory to a file outside it


def resolve_source(source) -> tuple[str, Union[list, str]]:
    """("rows"|"text", file paths) or ("hub", dataset id). A .txt file of a directory that is a
    symlink to a file outside it comes as a SkippedFile."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source or [])
    if not sources:
        raise DataError("no source given; pass an HF hub dataset id, data files, or a directory of "
                        ".txt files.")
    paths = []
    for s in map(os.fspath, sources):
        suffix = os.path.splitext(s)[1].lower()
        if os.path.isdir(s):
            txts = sorted(glob.glob(os.path.join(s, "**", "*.txt"), recursive=True))
            if not txts:
                raise DataError(f"directory {s!r} holds no .txt files; pass .txt files, a directory "
                                "of them, or .jsonl/.json/.parquet/.csv files.")
            root = os.path.realpath(s)
            for t in txts:  # a symlink must not bring in a file from elsewhere (~/.ssh/...)
                inside = os.path.commonpath([root, os.path.realpath(t)]) == root
                paths.append(t if inside else SkippedFile(t, OUTSIDE))
        elif os.path.isfile(s):
            if suffix not in ROW_SUFFIXES + (".txt",):
                raise DataError(f"{s!r} has an unknown file type {suffix or '(none)'!r}; use .jsonl, "
                                ".json, .parquet, .csv, .txt or a directory of .txt files.")
            paths.append(s)
        elif (len(sources) == 1 and suffix not in ROW_SUFFIXES + (".txt",)
              and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s) and not s.startswith(".")):
            return "hub", s
        else:
            raise MissingFileError(f"source {s!r} does not exist; give an existing file or directory, "
                                   "or an HF hub dataset id like 'owner/name'.")
    kinds = {"text" if isinstance(p, SkippedFile) or p.lower().endswith(".txt") else "rows"
             for p in paths}
    if len(kinds) > 1:
        raise DataError("cannot mix .txt documents with row files (.jsonl/.json/.parquet/.csv) in one "
                        "prepared directory; prepare them into separate --out directories.")
    return kinds.pop(), paths


def open_source(kind: str, where: Union[list[str], str], hf_split: str = "train") -> Source:
    """Open what resolve_source found; files are read only as the items are consumed."""
    if kind == "hub":
        items, total, fingerprint = hub_rows(where, hf_split)
        return Source("rows", items, total, fingerprint, repr(where), [])
    files = [p for p in where if not isinstance(p, SkippedFile)]  # skipped ones are never opened
    skipped_files: list[dict] = []

    def items():
        for path in where:
            if isinstance(path, SkippedFile):
                skipped_files.append({"path": os.path.abspath(path.path), "reason": path.reason})
                yield BadRow(path.reason)
                continue
            for row in file_rows(path):
                if kind == "text" and isinstance(row, BadRow):  # a document is a file: name it
                    skipped_files.append({"path": os.path.abspath(path), "reason": row.reason})
                yield row

    fingerprint = {"files": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p),
                              "sha256": _sha256(p)} for p in files]}
    described = repr(where[0]) if len(where) == 1 else f"{len(where)} files"
    return Source(kind, items(), len(where) if kind == "text" else None, fingerprint, described,
                  skipped_files)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: str) -> list:
    """A .json file's rows: a list of objects, or an object holding one (`data`, `rows`, `train`, ...)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path!r} is not valid UTF-8 JSON ({e}); fix the file or convert it to .jsonl, "
                        "where a bad line is skipped instead.") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("data", "rows", "train", "examples", "items"):
            if isinstance(data.get(key), list):
                return data[key]
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise DataError(f"{path!r} holds no list of rows; a .json source must be a list of objects or an "
                    "object with one list of objects (e.g. {\"data\": [...]}).")


def _json_rows(path: str) -> Iterator[Any]:
    yield from _read_json(path)


def _jsonl_rows(path: str) -> Iterator[Any]:
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue  # blank lines are not rows
            try:
                yield json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield BadRow("not_utf8")
            except json.JSONDecodeError:
                yield BadRow("malformed_json")


def _csv_rows(path: str) -> Iterator[Any]:
    csv.field_size_limit(1 << 30)  # answers can be long
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path!r} is not valid UTF-8 ({e}); re-encode it as UTF-8.") from None


def _parquet_rows(path: str) -> Iterator[Any]:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _txt_document(path: str) -> Iterator[Any]:
    """A .txt file is one document."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield BadRow("not_utf8")
        return
    yield text if text.strip() else BadRow("empty_document")


def file_rows(path: str) -> Iterator[Any]:
    """Rows of one file; a row that cannot be parsed comes out as BadRow (counted, not fatal)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    return _txt_document(path)


def hub_rows(hub_id: str, split: str):
    """(row iterator, row count, fingerprint) of an HF hub dataset split."""
    from ..hub_access import OFFLINE_HINT, unreachable_reason
    why = unreachable_reason()
    if why:
        raise DataError(f"{hub_id!r} is not a local path, and the HF hub cannot be reached to load "
                        f"it as a dataset ({why}); pass local .jsonl/.json/.parquet/.csv/.txt "
                        f"files, or prepare where there is network ({OFFLINE_HINT}).")
    try:
        import datasets
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, unknown id, missing split...: all end in one sentence
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{hub_id!r} is not a local path and could not be loaded as HF dataset "
                        f"{hub_id!r} split {split!r} ({reason}); check the path, the id, the split and "
                        "the network, or pass local .jsonl/.json/.parquet/.csv/.txt files.") from None

    def rows():
        for batch in ds.iter(batch_size=1000):
            keys = list(batch)
            for i in range(len(batch[keys[0]]) if keys else 0):
                yield {k: batch[k][i] for k in keys}

    return rows(), len(ds), {"hub_id": hub_id, "split": split,
                             "fingerprint": getattr(ds, "_fingerprint", None)}
