"""Data: prepare text (HF hub, local files, built-in tasks) into token files, and load batches from them.

    python -m reflex_jax.data prepare --source <hub id | files | dir> --tokenizer <hub id | dir | bytes> --out DIR
    python -m reflex_jax.data task --task mix --out DIR          # a built-in task (reflex_jax.tasks)
    python -m reflex_jax.data info DIR

A prepared directory holds, per split (`train`, `val`):
    {split}.tokens.bin       all rows, each bos + template(row) + eos, concatenated (uint16, uint32 if ids > 65535)
    {split}.mask.bin         uint8, 1 on the answer's tokens and the closing eos (all 1 for .txt documents)
    {split}.offsets.npy      int64 [rows + 1], where each row starts in the stream
    {split}.source_rows.npy  int64 [rows], the row's index in the source (checks, debugging)
and meta.json (tokenizer, special ids, template, source fingerprint, split sizes, skipped rows by reason).

The loader draws windows of seq_len + 1 tokens that start at a row start chosen by np.random.default_rng
([seed, step]) and run on into the following rows (packing); a window that runs past the end of the split
wraps around to its start. For .txt data a window starts at any token. So the global batch at a step is a
pure function of (seed, step), whatever the number of processes.
"""
from __future__ import annotations

import argparse
import array
import collections
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import string
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

DEFAULT_SOURCE = "Den4ikAI/russian_instructions_2"
DEFAULT_TOKENIZER = "ai-forever/rugpt3large_based_on_gpt2"
DEFAULT_TEMPLATE = "Вопрос: {question}\n### Ответ: {answer}"
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
LONG_ROWS = ("keep", "split", "drop")
FORMAT_VERSION = 1
_SPLIT_FILES = ("tokens.bin", "mask.bin", "offsets.npy", "source_rows.npy")
_COPY_CHUNK = 1 << 22  # tokens per read when copying rows into the train/val files


# ----------------------------------------------------------------------------------------- template

class _Bad(Exception):
    """A row that cannot be used; `reason` is the key it is counted under in meta["skipped"]."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Template:
    """A format string with named placeholders; the last one is the answer and ends the template.

    `fields` maps placeholders to row keys: entries `name` or `name=row_key` (default: each placeholder
    reads the row key of the same name), so other datasets work without changing the template.
    """

    def __init__(self, text: str, fields: Optional[Sequence[str]] = None):
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise ValueError(f"template {text!r} is not a valid format string ({e}); write literal "
                             "braces as {{ and }}.") from None
        self.text = text
        self.placeholders = []
        for _, name, spec, conv in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise ValueError(f"template placeholder {{{name}}} in {text!r} must be a plain named "
                                 "field like {question}.")
            self.placeholders.append(name)
        if not self.placeholders or parsed[-1][1] is None:
            raise ValueError(f"template {text!r} must end with the answer placeholder (e.g. "
                             "'... {answer}'), so that generation stops where the answer ends.")
        self.answer_field = self.placeholders[-1]
        if self.placeholders.count(self.answer_field) > 1:
            raise ValueError(f"template {text!r} uses the answer placeholder {{{self.answer_field}}} "
                             "twice; use it once, at the end.")
        self._parsed = parsed
        names = list(dict.fromkeys(self.placeholders))
        if fields is None:
            self.keys = {n: n for n in names}
        else:
            fields = [fields] if isinstance(fields, str) else list(fields)
            pairs = [f.split("=", 1) if "=" in f else [f, f] for f in fields]
            self.keys = {n.strip(): k.strip() for n, k in pairs}
            if sorted(self.keys) != sorted(names) or len(self.keys) != len(fields):
                raise ValueError(f"fields {fields} do not match the template placeholders {names}; "
                                 "give one entry per placeholder, as `name` or `name=row_key`.")

    def values(self, row: Any) -> dict[str, str]:
        """The placeholder values of a source row, or _Bad naming the first problem."""
        if not isinstance(row, dict):
            raise _Bad("not_an_object")
        out = {}
        for name, key in self.keys.items():
            v = row.get(key)
            if v is None:
                raise _Bad(f"missing_field({key})")
            if not isinstance(v, str):
                raise _Bad(f"non_string_field({key})")
            if not v.strip():
                raise _Bad(f"empty_field({key})")
            out[name] = v
        return out

    def prompt(self, values: dict[str, str]) -> str:
        """Everything before the answer, e.g. "Вопрос: ...\\n### Ответ: "."""
        parts = []
        for literal, name, _, _ in self._parsed:
            parts.append(literal)
            if name is not None and name != self.answer_field:
                parts.append(values[name])
        return "".join(parts)


# ---------------------------------------------------------------------------------------- tokenising

def token_dtype(max_id: int) -> np.dtype:
    """uint16 when every id fits (<= 65535), else uint32."""
    return np.dtype(np.uint16) if max_id <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def _max_id(tok) -> int:
    return max(tok.vocab_size - 1, tok.bos_id, tok.eos_id, tok.pad_id)


class _Encoder:
    """Tokenises whole rendered rows (so the ids equal a direct tokenisation of the text) and marks as
    answer every token that overlaps the answer's characters."""

    def __init__(self, tok):
        from .tokenizer import ByteTokenizer
        self.tok = tok
        self.is_bytes = isinstance(tok, ByteTokenizer)
        # the Rust `tokenizers` backend batch-encodes in parallel threads and gives char offsets
        self.backend = getattr(getattr(tok, "tok", None), "backend_tokenizer", None)

    def encode(self, texts: list[str], answer_starts: list[Optional[int]]):
        """[(ids int64, answer mask bool)] without bos/eos; answer_start None: the whole text counts."""
        if self.is_bytes:
            out = []
            for text, start in zip(texts, answer_starts):
                raw = text.encode("utf-8")
                ids = np.frombuffer(raw, np.uint8).astype(np.int64)
                n_prompt = 0 if start is None else len(text[:start].encode("utf-8"))
                out.append((ids, np.arange(len(ids)) >= n_prompt))
            return out
        if self.backend is not None:
            out = []
            for enc, start in zip(self.backend.encode_batch(texts, add_special_tokens=False),
                                  answer_starts):
                ids = np.asarray(enc.ids, np.int64)
                if start is None:
                    out.append((ids, np.ones(len(ids), bool)))
                else:
                    ends = np.fromiter((e for _, e in enc.offsets), np.int64, len(ids))
                    out.append((ids, ends > start))
            return out
        # any other tokenizer: answer tokens are those after the longest common prefix with the prompt
        full = self.tok.encode_batch(texts)
        prompts = self.tok.encode_batch([t[:s] if s is not None else "" for t, s in zip(texts,
                                                                                         answer_starts)])
        out = []
        for ids, p in zip(full, prompts):
            ids = np.asarray(ids, np.int64)
            k = 0
            while k < min(len(p), len(ids)) and p[k] == ids[k]:
                k += 1
            out.append((ids, np.arange(len(ids)) >= k))
        return out


# ------------------------------------------------------------------------------------------ sources

def _resolve(source) -> tuple[str, Union[list[str], str]]:
    """("rows"|"text", file paths) or ("hub", dataset id)."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source or [])
    if not sources:
        raise ValueError("no source given; pass an HF hub dataset id, data files, or a directory of "
                         ".txt files.")
    paths = []
    for s in map(os.fspath, sources):
        suffix = os.path.splitext(s)[1].lower()
        if os.path.isdir(s):
            txts = sorted(glob.glob(os.path.join(s, "**", "*.txt"), recursive=True))
            if not txts:
                raise ValueError(f"directory {s!r} holds no .txt files; pass .txt files, a directory "
                                 "of them, or .jsonl/.json/.parquet/.csv files.")
            paths += txts
        elif os.path.isfile(s):
            if suffix not in ROW_SUFFIXES + (".txt",):
                raise ValueError(f"{s!r} has an unknown file type {suffix or '(none)'!r}; use .jsonl, "
                                 ".json, .parquet, .csv, .txt or a directory of .txt files.")
            paths.append(s)
        elif (len(sources) == 1 and suffix not in ROW_SUFFIXES + (".txt",)
              and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s) and not s.startswith(".")):
            return "hub", s
        else:
            raise FileNotFoundError(f"source {s!r} does not exist; give an existing file or directory, "
                                    "or an HF hub dataset id like 'owner/name'.")
    kinds = {"text" if p.lower().endswith(".txt") else "rows" for p in paths}
    if len(kinds) > 1:
        raise ValueError("cannot mix .txt documents with row files (.jsonl/.json/.parquet/.csv) in one "
                         "prepared directory; prepare them into separate --out directories.")
    return kinds.pop(), paths


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
        raise ValueError(f"{path!r} is not valid UTF-8 JSON ({e}); fix the file or convert it to .jsonl, "
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
    raise ValueError(f"{path!r} holds no list of rows; a .json source must be a list of objects or an "
                     "object with one list of objects (e.g. {\"data\": [...]}).")


def _file_rows(path: str) -> Iterator[Any]:
    """Rows of one file; a row that cannot be parsed comes out as _Bad (counted, not fatal)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue  # blank lines are not rows
                try:
                    yield json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield _Bad("not_utf8")
                except json.JSONDecodeError:
                    yield _Bad("malformed_json")
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        csv.field_size_limit(1 << 30)  # answers can be long
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                yield from csv.DictReader(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path!r} is not valid UTF-8 ({e}); re-encode it as UTF-8.") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    else:  # .txt: one document per file
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            yield _Bad("not_utf8")
            return
        yield text if text.strip() else _Bad("empty_document")


def _hub_rows(hub_id: str, split: str):
    """(row iterator, row count, fingerprint) of an HF hub dataset split."""
    try:
        import datasets
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, unknown id, missing split...: all end in one sentence
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{hub_id!r} is not a local path and could not be loaded as HF dataset "
                         f"{hub_id!r} split {split!r} ({reason}); check the path, the id, the split and "
                         "the network, or pass local .jsonl/.json/.parquet/.csv/.txt files.") from None

    def rows():
        for batch in ds.iter(batch_size=1000):
            keys = list(batch)
            for i in range(len(batch[keys[0]]) if keys else 0):
                yield {k: batch[k][i] for k in keys}

    return rows(), len(ds), {"hub_id": hub_id, "split": split,
                             "fingerprint": getattr(ds, "_fingerprint", None)}


# ------------------------------------------------------------------------------------------ writing

class _StreamWriter:
    """Appends rows to one split's token and mask files; offsets and source rows are kept in memory
    (8 bytes per row each, as array('q')) and saved on close."""

    def __init__(self, directory: str, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self._tokens = open(_split_path(directory, split, "tokens.bin"), "wb")
        self._mask = open(_split_path(directory, split, "mask.bin"), "wb")
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
        np.save(_split_path(self.directory, self.split, "offsets.npy"), np.asarray(self.offsets, np.int64))
        np.save(_split_path(self.directory, self.split, "source_rows.npy"),
                np.asarray(self.source_rows, np.int64))
        return {"rows": self.rows, "tokens": self.tokens, "answer_tokens": self.answer_tokens}


def _fingerprint(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()


def _split_path(directory: str, split: str, what: str) -> str:
    return os.path.join(directory, f"{split}.{what}")


def _tokenise_into(writer: _StreamWriter, items: Iterable[Any], *, tok, template: Optional[Template],
                   skipped: collections.Counter, long_rows: str = "keep",
                   max_tokens: Optional[int] = None, batch_rows: int = 1024) -> dict:
    """Render, tokenise (in batches) and write rows; bad rows are counted in `skipped`.

    Returns the long-row policy and count, and the number of source rows seen. Long-row handling
    applies to template rows only: .txt documents (template None) are long and are streamed whole.
    """
    encoder = _Encoder(tok)
    bos, eos = np.array([tok.bos_id]), np.array([tok.eos_id])
    n_long = 0
    pending: list[tuple[int, str, Optional[int]]] = []
    pending_chars = 0

    def flush():
        nonlocal n_long
        encoded = encoder.encode([p[1] for p in pending], [p[2] for p in pending])
        for (source_row, _, start), (ids, answer) in zip(pending, encoded):
            ids = np.concatenate([bos, ids, eos])
            # bos is prompt (or text) and eos belongs to the answer: the model must learn to stop
            mask = np.concatenate([[start is None], answer, [True]])
            if template is not None and max_tokens is not None and len(ids) > max_tokens:
                n_long += 1
                if long_rows == "drop":
                    skipped["too_long"] += 1
                    continue
                if long_rows == "split":  # pieces of max_tokens; each piece is a row (a window start)
                    for a in range(0, len(ids), max_tokens):
                        writer.add(ids[a:a + max_tokens], mask[a:a + max_tokens], source_row)
                    continue
            writer.add(ids, mask, source_row)
        pending.clear()

    source_row = -1
    for source_row, item in enumerate(items):
        if isinstance(item, _Bad):
            skipped[item.reason] += 1
            continue
        if template is None:
            text, start = item, None
        else:
            try:
                values = template.values(item)
            except _Bad as bad:
                skipped[bad.reason] += 1
                continue
            prompt = template.prompt(values)
            text, start = prompt + values[template.answer_field], len(prompt)
        pending.append((source_row, text, start))
        pending_chars += len(text)
        if len(pending) >= batch_rows or pending_chars >= 1 << 24:
            flush()
            pending_chars = 0
    if pending:
        flush()
    return {"policy": long_rows, "max_tokens": max_tokens, "rows": n_long, "seen": source_row + 1}


def _copy_rows(src_dir: str, src: str, dst_dir: str, dst: str, rows: np.ndarray, dtype) -> dict:
    """Write the given (sorted) rows of split `src` as split `dst`, copying runs of consecutive rows
    in bounded chunks (plain reads, not a memory map, so resident memory stays at one chunk)."""
    assert len(rows), "callers only copy non-empty splits"
    offsets = np.load(_split_path(src_dir, src, "offsets.npy"))
    source_rows = np.load(_split_path(src_dir, src, "source_rows.npy"))
    answer = 0
    with open(_split_path(src_dir, src, "tokens.bin"), "rb") as st, \
            open(_split_path(src_dir, src, "mask.bin"), "rb") as sm, \
            open(_split_path(dst_dir, dst, "tokens.bin"), "wb") as dt, \
            open(_split_path(dst_dir, dst, "mask.bin"), "wb") as dm:
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
    np.save(_split_path(dst_dir, dst, "offsets.npy"), new_offsets)
    np.save(_split_path(dst_dir, dst, "source_rows.npy"), source_rows[rows])
    return {"rows": int(len(rows)), "tokens": int(new_offsets[-1]), "answer_tokens": answer}


def _val_rows(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """The sorted row indices of the validation split: round(n * fraction), at least 1 when asked for."""
    if val_fraction == 0:
        return np.zeros(0, np.int64)
    if n < 2:
        raise ValueError(f"only {n} usable row(s), too few for a validation split; add data or pass "
                         "--val_fraction 0.")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, n_val, replace=False))


def _publish(tmp_dir: str, out_dir: str, meta: dict) -> None:
    """Move finished files into out_dir, meta.json last: a directory with meta.json is complete, and
    concurrent writers of the same data (several processes) only ever replace whole files."""
    os.makedirs(out_dir, exist_ok=True)
    old = _read_meta(out_dir)
    if old is not None and old.get("fingerprint") != meta.get("fingerprint"):
        os.remove(os.path.join(out_dir, "meta.json"))  # never pair an old meta with new token files
    for split in ("train", "val"):
        for what in _SPLIT_FILES:
            src = _split_path(tmp_dir, split, what)
            if os.path.exists(src):
                os.replace(src, _split_path(out_dir, split, what))
            elif split not in meta["splits"] and os.path.exists(_split_path(out_dir, split, what)):
                os.remove(_split_path(out_dir, split, what))  # stale file of an earlier preparation
    with open(os.path.join(tmp_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1, default=list)  # tuples of task options
    os.replace(os.path.join(tmp_dir, "meta.json"), os.path.join(out_dir, "meta.json"))


def _tmp_dir(out_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # same filesystem as out_dir so that os.replace is a rename
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)


def _summary(meta: dict, seconds: float) -> str:
    splits = ", ".join(f"{name} {s['rows']:,} rows / {s['tokens']:,} tokens"
                       for name, s in meta["splits"].items())
    skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(meta["skipped"].items())) or "none"
    line = f"prepared {splits} ({meta['dtype']}) in {seconds:.1f}s; skipped rows: {skipped}"
    long_rows = meta.get("long_rows") or {}
    if long_rows.get("rows"):
        line += (f"; {long_rows['rows']:,} rows over {long_rows['max_tokens']:,} tokens "
                 f"({ {'keep': 'kept', 'split': 'split', 'drop': 'dropped'}[long_rows['policy']] })")
    return line


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.")


def _check_options(val_fraction, seed, long_rows, max_tokens, batch_rows) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.005.")
    _check_int("seed", seed, 0)
    if long_rows not in LONG_ROWS:
        raise ValueError(f"long_rows={long_rows!r} is not one of {', '.join(LONG_ROWS)}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 2 (or None for no limit).")
    if long_rows != "keep" and max_tokens is None:
        raise ValueError(f"long_rows={long_rows!r} needs max_tokens (e.g. the model's block_size + 1).")
    _check_int("batch_rows", batch_rows, 1)


def prepare(source, tokenizer: str, out_dir: str, *, template: str = DEFAULT_TEMPLATE,
            fields: Optional[Sequence[str]] = None, val_fraction: float = 0.005, seed: int = 0,
            long_rows: str = "keep", max_tokens: Optional[int] = None, hf_split: str = "train",
            batch_rows: int = 1024, progress: bool = True, verbose: bool = True) -> dict:
    """Tokenise `source` (an HF hub id, data files, or .txt files / a directory of them) into out_dir.

    Rows are rendered with `template` (placeholders filled from the row keys `fields` names) and wrapped
    in bos/eos; .txt files are one document each, no template. Valid rows are split into train/val
    (round(rows * val_fraction) val rows, at least one, chosen by `seed`). Rows longer than max_tokens
    are kept, split into max_tokens pieces, or dropped (`long_rows`). Returns meta.json's content.
    """
    from tqdm import tqdm
    from .tokenizer import load_tokenizer

    t0 = time.time()
    _check_options(val_fraction, seed, long_rows, max_tokens, batch_rows)
    kind, where = _resolve(source)
    tmpl = Template(template, fields) if kind != "text" else None  # template mistakes fail first
    total = None
    if kind == "hub":
        items, total, fingerprint = _hub_rows(where, hf_split)
        kind, described = "rows", repr(where)
    else:
        items = (row for path in where for row in _file_rows(path))
        fingerprint = {"files": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p),
                                  "sha256": _sha256(p)} for p in where]}
        described = repr(where[0]) if len(where) == 1 else f"{len(where)} files"
        if kind == "text":
            total = len(where)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(_max_id(tok))

    tmp = _tmp_dir(out_dir)
    try:
        skipped: collections.Counter = collections.Counter()
        writer = _StreamWriter(tmp, "all", dtype)
        bar = tqdm(items, total=total, unit="doc" if kind == "text" else "row",
                   desc="tokenising", disable=not progress, mininterval=0.5)
        long_info = _tokenise_into(writer, bar, tok=tok, template=tmpl, skipped=skipped,
                                   long_rows=long_rows, max_tokens=max_tokens, batch_rows=batch_rows)
        bar.close()
        written = writer.close()
        if written["rows"] == 0:
            reasons = ", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "the source is empty"
            what = "documents" if kind == "text" else f"rows (fields {list(tmpl.keys.values())})"
            raise ValueError(f"no usable {what} in {described} ({reasons}); check the source, and "
                             "that --fields/--template name the data's fields.")
        # val is drawn over source rows, so that the pieces of a split row stay in one split
        source_rows = np.load(_split_path(tmp, "all", "source_rows.npy"))
        unique_rows = np.unique(source_rows)
        val_sources = unique_rows[_val_rows(len(unique_rows), val_fraction, seed)]
        is_val = np.isin(source_rows, val_sources)
        splits = {"train": _copy_rows(tmp, "all", tmp, "train", np.flatnonzero(~is_val), dtype)}
        if is_val.any():
            splits["val"] = _copy_rows(tmp, "all", tmp, "val", np.flatnonzero(is_val), dtype)
        for what in _SPLIT_FILES:
            os.remove(_split_path(tmp, "all", what))
        meta = {
            "format_version": FORMAT_VERSION, "kind": kind,
            "tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "dtype": dtype.name,
            "template": tmpl.text if tmpl else None, "fields": tmpl.keys if tmpl else None,
            "source": fingerprint, "source_rows": long_info.pop("seen"),
            "val_fraction": val_fraction, "seed": seed,
            "long_rows": long_info if kind == "rows" else None,
            "splits": splits, "skipped": dict(sorted(skipped.items())),
        }
        meta["fingerprint"] = _fingerprint({k: meta[k] for k in (
            "format_version", "tokenizer", "template", "fields", "source", "val_fraction", "seed",
            "long_rows")})
        seconds = time.time() - t0
        meta["prepare_seconds"] = round(seconds, 3)
        meta["summary"] = _summary(meta, seconds)
        _publish(tmp, out_dir, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(meta["summary"])
    return meta


# ----------------------------------------------------------------------------------- built-in tasks

def _tokenizer_name(tokenizer: str) -> str:
    return os.path.abspath(tokenizer) if os.path.isdir(tokenizer) else tokenizer


def prepare_task(task: str, out_dir: str, *, tokenizer: str = "bytes", n_train: int = 20000,
                 n_val: int = 256, seed: int = 0, template: str = DEFAULT_TEMPLATE,
                 verbose: bool = True, **task_options) -> dict:
    """Generate a built-in task (reflex_jax.tasks) into out_dir, in the same format as prepare().

    Validation questions never appear in train (train rows that repeat one are redrawn), so exact
    match on val measures generalisation. Idempotent: when out_dir already holds this task with the
    same arguments, the existing meta is returned without redoing work.
    """
    from .tasks import TASK_VERSION, get_task
    from .tokenizer import load_tokenizer

    t0 = time.time()
    t = get_task(task)
    t.options(**task_options)  # validates before any work
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 0), ("seed", seed, 0)):
        _check_int(name, value, low)
    tmpl = Template(template)
    if set(tmpl.keys) != {"question", tmpl.answer_field}:
        raise ValueError(f"template {template!r} must use the placeholders {{question}} and {{answer}} "
                         "for a built-in task.")
    args = {"format_version": FORMAT_VERSION, "task": task, "task_version": TASK_VERSION,
            "options": task_options, "tokenizer": _tokenizer_name(tokenizer), "n_train": n_train,
            "n_val": n_val, "seed": seed, "template": template}
    fingerprint = _fingerprint(args)
    old = _read_meta(out_dir)
    if old is not None and old.get("fingerprint") == fingerprint:
        try:
            TokenData.open(out_dir)  # the token files are there too
            if verbose:
                print(f"{out_dir}: up to date ({old['summary']})")
            return old
        except (OSError, ValueError):
            pass  # damaged: rebuild

    val = t.rows(n_val, f"{seed}-val", **task_options)
    held_out = {r["question"] for r in val}
    train: list[dict] = []
    for k in range(20):  # redraw train rows that repeat a val question
        if len(train) == n_train:
            break
        fresh = t.rows(n_train, f"{seed}-train-{k}", **task_options)
        train += [r for r in fresh if r["question"] not in held_out][:n_train - len(train)]
    if len(train) < n_train:
        raise ValueError(f"task {task!r} with options {task_options or 'default'} has too few distinct "
                         f"questions for {n_train} training rows outside {n_val} validation rows; "
                         "widen the task options or lower n_train/n_val.")

    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(_max_id(tok))
    tmp = _tmp_dir(out_dir)
    try:
        splits, skipped = {}, collections.Counter()
        for name, rows in (("train", train), ("val", val)):
            if rows:
                writer = _StreamWriter(tmp, name, dtype)
                _tokenise_into(writer, rows, tok=tok, template=tmpl, skipped=skipped)
                splits[name] = writer.close()
        meta = {
            "format_version": FORMAT_VERSION, "kind": "rows",
            "tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "dtype": dtype.name,
            "template": template, "fields": tmpl.keys,
            "source": {"task": task, "task_version": TASK_VERSION,
                       "options": {**t.defaults, **task_options}},
            "source_rows": n_train + n_val, "val_fraction": None, "seed": seed, "long_rows": None,
            "splits": splits, "skipped": dict(skipped), "task": task, "fingerprint": fingerprint,
        }
        seconds = time.time() - t0
        meta["prepare_seconds"] = round(seconds, 3)
        meta["summary"] = f"task {task}: " + _summary(meta, seconds)
        _publish(tmp, out_dir, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(meta["summary"])
    return meta


def task_val_rows(meta: dict) -> list[dict]:
    """The validation rows (question/answer) of a directory prepare_task made, regenerated from its
    meta exactly as they were drawn (for exact-match evaluation)."""
    from .tasks import get_task
    if not meta.get("task"):
        raise ValueError("this prepared directory was not made by prepare_task, so it has no task rows; "
                         "use a built-in task (data.task) for exact-match evaluation.")
    n_val = meta["splits"].get("val", {}).get("rows", 0)
    return get_task(meta["task"]).rows(n_val, f"{meta['seed']}-val", **meta["source"]["options"])


# ------------------------------------------------------------------------------------------ reading

def _read_meta(directory: str) -> Optional[dict]:
    """meta.json of a prepared directory, or None where there is none (or it is unreadable)."""
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


class TokenData:
    """An opened prepared directory: meta plus memory-mapped token/mask files per split."""

    def __init__(self, directory: str, meta: dict):
        self.directory, self.meta = directory, meta
        self.vocab_size: int = meta["vocab_size"]
        self.bos_id, self.eos_id, self.pad_id = meta["bos_id"], meta["eos_id"], meta["pad_id"]
        self.kind: str = meta["kind"]
        self.dtype = np.dtype(meta["dtype"])
        self._cache: dict = {}

    @classmethod
    def open(cls, directory: str) -> "TokenData":
        hint = (f"prepare it with `python -m reflex_jax.data prepare --out {directory} ...` (or "
                "`... task`) first")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"prepared data directory {directory!r} does not exist; {hint}.")
        if not os.path.exists(os.path.join(directory, "meta.json")):
            raise FileNotFoundError(f"{directory!r} is not a prepared data directory (no meta.json); "
                                    f"{hint}.")
        meta = _read_meta(directory)
        if meta is None or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory!r} has an unreadable meta.json or one from another format "
                             f"version (want {FORMAT_VERSION}); {hint} again.")
        data = cls(directory, meta)
        for split, info in meta["splits"].items():
            for what, itemsize in (("tokens.bin", data.dtype.itemsize), ("mask.bin", 1)):
                path = _split_path(directory, split, what)
                size = os.path.getsize(path) if os.path.exists(path) else -1
                if size != info["tokens"] * itemsize:
                    raise ValueError(f"{path!r} is missing or has the wrong size for "
                                     f"{info['tokens']:,} tokens; {hint} again.")
        return data

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def _check_split(self, name: str) -> None:
        if name not in self.meta["splits"]:
            raise ValueError(f"split {name!r} is not in {self.directory!r} (it has "
                             f"{', '.join(self.splits)}); prepare with --val_fraction > 0 for a val split.")

    def _get(self, name: str, what: str):
        self._check_split(name)
        key = (name, what)
        if key not in self._cache:
            path = _split_path(self.directory, name, what)
            if what == "tokens.bin":
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

    def rows(self, name: str, start: int = 0, stop: Optional[int] = None):
        """(tokens, mask) of rows start..stop of a split, each as its own array."""
        off = self.offsets(name)
        tokens, mask = self.split(name), self.mask(name)
        return [(np.asarray(tokens[off[i]:off[i + 1]]), np.asarray(mask[off[i]:off[i + 1]]))
                for i in range(start, len(off) - 1 if stop is None else stop)]

    def tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self.meta["tokenizer"])


def _window(stream: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` items from `start`, wrapping around the end of the stream."""
    n = len(stream)
    if start + length <= n:
        return np.asarray(stream[start:start + length])
    return np.asarray(stream[(start + np.arange(length)) % n])


class BatchLoader:
    """Training batches: the global batch at a step is a pure function of (seed, step).

    Window starts come from np.random.default_rng([seed, step]): row starts for template data,
    any token for .txt data. Each process reads only its slice [pi*b, (pi+1)*b) of the global batch.
    """

    def __init__(self, data: TokenData, split: str, batch_size: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        for name, v, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0),
                             ("process_count", process_count, 1), ("process_index", process_index, 0)):
            _check_int(name, v, low)
        if process_index >= process_count:
            raise ValueError(f"process_index={process_index} must be below process_count={process_count}.")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be divisible by the process count "
                             f"{process_count}; pick a multiple of {process_count}.")
        self.data, self.split = data, split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.local_batch = batch_size // process_count
        self.process_index = process_index
        self.tokens, self.mask = data.split(split), data.mask(split)
        self.starts = data.offsets(split)[:-1] if data.kind == "rows" else None

    def global_starts(self, step: int) -> np.ndarray:
        """Stream positions where the global batch's windows start (all processes agree)."""
        _check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, int(step)])
        if self.starts is not None:
            return self.starts[rng.integers(0, len(self.starts), self.batch_size)]
        return rng.integers(0, len(self.tokens), self.batch_size)

    def batch(self, step: int) -> dict:
        """{"tokens": int32 [b, seq_len+1], "mask": float32 [b, seq_len+1]}; b = batch_size/processes."""
        lo = self.process_index * self.local_batch
        starts = self.global_starts(step)[lo:lo + self.local_batch]
        length = self.seq_len + 1
        tokens = np.stack([_window(self.tokens, int(s), length) for s in starts]).astype(np.int32)
        mask = np.stack([_window(self.mask, int(s), length) for s in starts]).astype(np.float32)
        return {"tokens": tokens, "mask": mask}


def val_batches(data: TokenData, batch_size: int, seq_len: int, n_batches: int,
                split: str = "val") -> list[dict]:
    """Fixed validation batches from the start of a split, each token a target at most once.

    Template data: whole rows packed greedily into windows that start at a row start (a row longer
    than a window continues in the next one), so answers keep their question. Text: consecutive
    windows. A window overlaps the previous by one token so no target is lost. Unused places hold
    pad_id with mask = valid = 0. At most n_batches (fewer if the split is small, at least 1).
    """
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("n_batches", n_batches)):
        _check_int(name, v, 1)
    tokens, mask = data.split(split), data.mask(split)
    length, want = seq_len + 1, n_batches * batch_size
    offsets = data.offsets(split) if data.kind == "rows" else np.array([0, len(tokens)])
    windows: list[tuple[int, int]] = []  # [a, b) ranges of the stream
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
    windows = windows[:want]
    n = -(-len(windows) // batch_size)
    out = []
    for i in range(n):
        t = np.full((batch_size, length), data.pad_id, np.int32)
        m = np.zeros((batch_size, length), np.float32)
        v = np.zeros((batch_size, length), np.float32)
        for j, (a, b) in enumerate(windows[i * batch_size:(i + 1) * batch_size]):
            t[j, :b - a] = tokens[a:b]
            m[j, :b - a] = mask[a:b]
            v[j, :b - a] = 1.0
        out.append({"tokens": t, "mask": m, "valid": v})
    return out


# ---------------------------------------------------------------------------------------------- CLI

def _unescape(text: str) -> str:
    """Shell-friendly templates: a typed backslash-n is a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reflex_jax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="tokenise an HF dataset or local files into a directory")
    pp.add_argument("--source", nargs="+", default=[DEFAULT_SOURCE],
                    help="HF hub dataset id, or .jsonl/.json/.parquet/.csv/.txt files or directories of "
                         f".txt (default {DEFAULT_SOURCE})")
    pp.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help=f"HF hub id, tokenizer directory, or 'bytes' (default {DEFAULT_TOKENIZER})")
    pp.add_argument("--out", required=True, help="output directory")
    pp.add_argument("--template", default=DEFAULT_TEMPLATE,
                    help="row template; \\n and \\t are unescaped (default %(default)r)")
    pp.add_argument("--fields", default=None,
                    help="comma list: placeholder or placeholder=row_key (default: the placeholders)")
    pp.add_argument("--val_fraction", type=float, default=0.005)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--long_rows", choices=LONG_ROWS, default="keep")
    pp.add_argument("--max_tokens", type=int, default=None, help="row length limit for --long_rows")
    pp.add_argument("--hf_split", default="train", help="split of a hub dataset to read")
    pp.add_argument("--batch_rows", type=int, default=1024, help="rows per tokenizer call")
    pp.add_argument("--no_progress", action="store_true")
    pt = sub.add_parser("task", help="generate a built-in task (reflex_jax.tasks) into a directory")
    pt.add_argument("--task", required=True)
    pt.add_argument("--out", required=True)
    pt.add_argument("--tokenizer", default="bytes")
    pt.add_argument("--n_train", type=int, default=20000)
    pt.add_argument("--n_val", type=int, default=256)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--template", default=DEFAULT_TEMPLATE)
    pt.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. --option n_pairs=8 (repeatable)")
    pi = sub.add_parser("info", help="print a prepared directory's summary and meta.json")
    pi.add_argument("dir")
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.source, args.tokenizer, args.out, template=_unescape(args.template),
                    fields=args.fields.split(",") if args.fields else None,
                    val_fraction=args.val_fraction, seed=args.seed, long_rows=args.long_rows,
                    max_tokens=args.max_tokens, hf_split=args.hf_split, batch_rows=args.batch_rows,
                    progress=not args.no_progress)
        elif args.command == "task":
            options = {}
            for item in args.option:
                if "=" not in item:
                    raise ValueError(f"--option {item!r} must look like KEY=VALUE, e.g. n_pairs=8.")
                k, v = item.split("=", 1)
                options[k.strip()] = _option_value(v)
            prepare_task(args.task, args.out, tokenizer=args.tokenizer, n_train=args.n_train,
                         n_val=args.n_val, seed=args.seed,
                         template=_unescape(args.template), **options)
        else:
            meta = TokenData.open(args.dir).meta
            print(meta.get("summary", ""))
            print(json.dumps(meta, ensure_ascii=False, indent=1))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
