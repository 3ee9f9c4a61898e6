"""Preparing a directory: prepare() for HF hub datasets and local files, prepare_task() for the
built-in tasks. Both write to a temporary directory next to out_dir and publish it whole; both
reuse a directory that already holds the same preparation, and neither replaces a different one
that cannot be regenerated from its meta.json unless told to (existing.py)."""
from __future__ import annotations

import collections
import contextlib
import os
import shutil
import time
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from .checks import check_int, check_prepare_options
from .encode import max_token_id, token_dtype, tokenise_into
from .existing import check_replace, preparation_inputs, up_to_date
from .sources import Source, open_source, resolve_source
from .store import FORMAT_VERSION, read_data_meta, split_path
from .tasks import TASK_VERSION, Task, get_task
from .templates import DEFAULT_TEMPLATE, Template
from .windows import share
from .writer import StreamWriter, WriteFailed, copy_rows, fingerprint, make_tmp_dir, publish, remove_split


def prepare(source, tokenizer: str, out_dir: str, *, template: str = DEFAULT_TEMPLATE,
            fields: Optional[Sequence[str]] = None, val_fraction: float = 0.005, seed: int = 0,
            long_rows: str = "keep", max_tokens: Optional[int] = None, hf_split: str = "train",
            batch_rows: int = 1024, overwrite: bool = False, progress: bool = True,
            verbose: bool = True, val_source=None) -> dict:
    """Tokenise `source` (an HF hub id, data files, or .txt files / a directory of them) into out_dir.

    Rows are rendered with `template` (placeholders filled from the row keys `fields` names) and wrapped
    in bos/eos; .txt files are one document each, no template. Valid rows are split into train/val
    (round(rows * val_fraction) val rows, at least one, chosen by `seed`), or, with `val_source`
    (files of the same kind, e.g. one held-out author), all of `source` is train and all of
    `val_source` is val (val_fraction and seed are then unused). Rows longer than max_tokens
    are kept (training windows start inside them, see windows.py), split into max_tokens pieces, or
    dropped (`long_rows`). When out_dir already holds this preparation it is reused; when it holds
    another one, overwrite=True replaces it. Returns meta.json's content.
    """
    from .tokenizer import load_tokenizer

    t0 = time.time()
    check_prepare_options(val_fraction, seed, long_rows, max_tokens, batch_rows)
    kind, where = resolve_source(source)
    tmpl = Template(template, fields) if kind != "text" else None  # template mistakes fail first
    src = open_source(kind, where, hf_split)
    vsrc = _open_val_source(val_source, src, hf_split) if val_source is not None else None
    if vsrc is not None:
        val_fraction, seed = None, None  # the split is given, not drawn
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(max_token_id(tok))
    inputs = preparation_inputs({
        "format_version": FORMAT_VERSION, "kind": src.kind, "tokenizer": tok.name,
        "template": tmpl.text if tmpl else None, "fields": tmpl.keys if tmpl else None,
        "source": src.fingerprint, "val_fraction": val_fraction, "seed": seed,
        "long_rows": {"policy": long_rows, "max_tokens": max_tokens} if src.kind == "rows" else None,
        "val_source": vsrc.fingerprint if vsrc else None})
    old = up_to_date(out_dir, inputs, verbose)
    if old is not None:
        return old
    check_replace(out_dir, inputs, overwrite)

    with _temporary_dir(out_dir) as tmp:
        skipped: collections.Counter = collections.Counter()
        opts = dict(long_rows=long_rows, max_tokens=max_tokens, batch_rows=batch_rows, progress=progress)
        if vsrc is None:
            long_info = _tokenise_source(tmp, src, tok, tmpl, dtype, skipped, "all", **opts)
            long_info.pop("split")
            splits = _split_train_val(tmp, dtype, val_fraction, seed)
        else:
            long_info = _tokenise_source(tmp, src, tok, tmpl, dtype, skipped, "train", **opts)
            val_info = _tokenise_source(tmp, vsrc, tok, tmpl, dtype, skipped, "val", **opts)
            splits = {"train": long_info.pop("split"), "val": val_info.pop("split")}
            for k in ("seen", "rows", "dropped_answer_tokens"):
                long_info[k] += val_info[k]
            long_info["longest"] = max(long_info["longest"], val_info["longest"])
        seen = long_info.pop("seen")
        # meta's long_rows keeps the policy, its limit and the count (as fingerprinted)
        lengths = {k: long_info.pop(k) for k in ("longest", "dropped_answer_tokens")}
        meta = {
            "format_version": FORMAT_VERSION, "kind": src.kind, **_tokenizer_meta(tok, dtype),
            "template": tmpl.text if tmpl else None, "fields": tmpl.keys if tmpl else None,
            "source": src.fingerprint, "source_rows": seen,
            "val_fraction": val_fraction, "seed": seed, "row_lengths": lengths,
            **({"val_source": vsrc.fingerprint} if vsrc else {}),
            "long_rows": long_info if src.kind == "rows" else None,
            "splits": splits, "skipped": dict(sorted(skipped.items())),
        }
        if src.kind == "text":  # a document is a file: say which ones were skipped, and why
            meta["skipped_files"] = src.skipped_files + (vsrc.skipped_files if vsrc else [])
        # val_source joins the fingerprint only when given, so earlier preparations keep theirs
        meta["fingerprint"] = fingerprint({k: meta[k] for k in (
            "format_version", "tokenizer", "template", "fields", "source", "val_fraction", "seed",
            "long_rows") + (("val_source",) if vsrc else ())})
        _publish_with_summary(tmp, out_dir, meta, t0)
    if verbose:
        print(meta["summary"])
    return meta


@contextlib.contextmanager
def _temporary_dir(out_dir: str):
    """A temporary directory beside out_dir, removed on exit; a failed write (full disk, quota,
    read-only or size-limited file system) ends in one sentence saying out_dir was not published."""
    had_data = read_data_meta(out_dir) is not None
    tmp = None
    try:
        tmp = make_tmp_dir(out_dir)
        yield tmp
    except WriteFailed as e:
        parent = os.path.dirname(os.path.abspath(out_dir))
        what = (f"write {e.nbytes:,} bytes in {parent!r}" if e.nbytes is not None
                else f"create or move files in {parent!r}")
        if e.partly_published:
            state = "it is left without a meta.json, so it reads as not prepared"
        else:
            state = "its earlier preparation is unchanged" if had_data else "nothing was left there"
        raise DataError(f"could not {what} ({e.reason}), so {out_dir!r} was not published and "
                        f"{state}; free space there or write the data elsewhere (prepare's "
                        "--out; train.py writes a task's data under --config.run_dir).") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _open_val_source(val_source, src: Source, hf_split: str) -> Source:
    kind, where = resolve_source(val_source)
    vsrc = open_source(kind, where, hf_split)
    if vsrc.kind != src.kind:
        raise DataError(f"the val source {vsrc.described} holds {vsrc.kind} but the source "
                        f"{src.described} holds {src.kind}; give a val source of the same kind "
                        "(.txt documents for .txt, row files for row files).")
    return vsrc


def _tokenise_source(tmp: str, src: Source, tok, tmpl: Optional[Template], dtype,
                     skipped: collections.Counter, split: str, *, long_rows: str,
                     max_tokens: Optional[int], batch_rows: int, progress: bool) -> dict:
    """Write every usable row of the source as `split` of `tmp`; tokenise_into's long-row info,
    with the split's sizes under "split"."""
    from tqdm import tqdm

    writer = StreamWriter(tmp, split, dtype)
    bar = tqdm(src.items, total=src.total, unit="doc" if src.kind == "text" else "row",
               desc="tokenising", disable=not progress, mininterval=0.5)
    long_info = tokenise_into(writer, bar, tok=tok, template=tmpl, skipped=skipped,
                              long_rows=long_rows, max_tokens=max_tokens, batch_rows=batch_rows)
    bar.close()
    sizes = writer.close()
    if sizes["rows"] == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "the source is empty"
        what = "documents" if src.kind == "text" else f"rows (fields {list(tmpl.keys.values())})"
        raise DataError(f"no usable {what} in {src.described} ({reasons}); check the source, and "
                        "that --fields/--template name the data's fields.")
    return {**long_info, "split": sizes}


def _split_train_val(tmp: str, dtype, val_fraction: float, seed: int) -> dict:
    """Copy split "all" of `tmp` into train and val (val only when it gets rows), then remove it.

    Val is drawn over source rows, so that the pieces of a split row stay in one split."""
    source_rows = np.load(split_path(tmp, "all", "source_rows.npy"))
    unique_rows = np.unique(source_rows)
    val_sources = unique_rows[_val_rows(len(unique_rows), val_fraction, seed)]
    is_val = np.isin(source_rows, val_sources)
    splits = {"train": copy_rows(tmp, "all", tmp, "train", np.flatnonzero(~is_val), dtype)}
    if is_val.any():
        splits["val"] = copy_rows(tmp, "all", tmp, "val", np.flatnonzero(is_val), dtype)
    remove_split(tmp, "all")
    return splits


def _val_rows(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """The sorted row indices of the validation split: round(n * fraction), at least 1 when asked for."""
    if val_fraction == 0:
        return np.zeros(0, np.int64)
    if n < 2:
        raise DataError(f"only {n} usable row(s), too few for a validation split; add data or pass "
                        "--val_fraction 0.")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, n_val, replace=False))


def _tokenizer_meta(tok, dtype) -> dict:
    return {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "dtype": dtype.name}


def _publish_with_summary(tmp: str, out_dir: str, meta: dict, t0: float, prefix: str = "") -> None:
    seconds = time.time() - t0
    meta["prepare_seconds"] = round(seconds, 3)
    meta["summary"] = prefix + _summary(meta, seconds)
    publish(tmp, out_dir, meta)


def _summary(meta: dict, seconds: float) -> str:
    splits = ", ".join(f"{name} {s['rows']:,} rows / {s['tokens']:,} tokens"
                       for name, s in meta["splits"].items())
    skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(meta["skipped"].items())) or "none"
    line = f"prepared {splits} ({meta['dtype']}) in {seconds:.1f}s; skipped rows: {skipped}"
    long_rows = meta.get("long_rows") or {}
    if long_rows.get("rows"):
        line += (f"; {long_rows['rows']:,} rows over {long_rows['max_tokens']:,} tokens "
                 f"({ {'keep': 'kept', 'split': 'split', 'drop': 'dropped'}[long_rows['policy']] })")
    lengths = meta.get("row_lengths")
    if lengths and meta["kind"] == "rows":
        # kept and split rows are reached whole by the loader's windows; only dropped rows are lost
        lost = lengths["dropped_answer_tokens"]
        total = lost + sum(s["answer_tokens"] for s in meta["splits"].values())
        line += (f"; longest row {lengths['longest']:,} tokens; answer tokens out of reach: "
                 f"{share(lost, total) if lost else 'none'}")
    return line


# ----------------------------------------------------------------------------------- built-in tasks

def prepare_task(task: str, out_dir: str, *, tokenizer: str = "bytes", n_train: int = 20000,
                 n_val: int = 256, seed: int = 0, template: str = DEFAULT_TEMPLATE,
                 overwrite: bool = False, verbose: bool = True, **task_options) -> dict:
    """Generate a built-in task (reflex_jax.data.tasks) into out_dir, in the same format as prepare().

    Validation questions never appear in train (train rows that repeat one are redrawn), so exact
    match on val measures generalisation. Idempotent: when out_dir already holds this task with the
    same arguments, the existing meta is returned without redoing work. A task directory made with
    other arguments is regenerated (it is a pure function of its meta.json, so nothing is lost); data
    that prepare() made from a source is replaced only with overwrite=True.
    """
    from .tokenizer import load_tokenizer

    t0 = time.time()
    t = get_task(task)
    t.options(**task_options)  # validates before any work
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 0), ("seed", seed, 0)):
        check_int(name, value, low)
    tmpl = Template(template)
    if set(tmpl.keys) != {"question", tmpl.answer_field}:
        raise DataError(f"template {template!r} must use the placeholders {{question}} and {{answer}} "
                        "for a built-in task.")
    args = {"format_version": FORMAT_VERSION, "task": task, "task_version": TASK_VERSION,
            "options": task_options, "tokenizer": _tokenizer_name(tokenizer), "n_train": n_train,
            "n_val": n_val, "seed": seed, "template": template}
    inputs = preparation_inputs({"task_fingerprint": fingerprint(args)})
    old = up_to_date(out_dir, inputs, verbose)
    if old is not None:
        return old
    check_replace(out_dir, inputs, overwrite)

    train, val = _task_rows(t, task, n_train, n_val, seed, task_options)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(max_token_id(tok))
    with _temporary_dir(out_dir) as tmp:
        splits, skipped, longest = {}, collections.Counter(), 0
        for name, rows in (("train", train), ("val", val)):
            if rows:
                writer = StreamWriter(tmp, name, dtype)
                info = tokenise_into(writer, rows, tok=tok, template=tmpl, skipped=skipped)
                splits[name], longest = writer.close(), max(longest, info["longest"])
        meta = {
            "format_version": FORMAT_VERSION, "kind": "rows", **_tokenizer_meta(tok, dtype),
            "template": template, "fields": tmpl.keys,
            "source": {"task": task, "task_version": TASK_VERSION,
                       "options": {**t.defaults, **task_options}},
            "source_rows": n_train + n_val, "val_fraction": None, "seed": seed, "long_rows": None,
            "row_lengths": {"longest": longest, "dropped_answer_tokens": 0},
            "splits": splits, "skipped": dict(skipped), "task": task,
            "fingerprint": inputs["task_fingerprint"],
        }
        _publish_with_summary(tmp, out_dir, meta, t0, prefix=f"task {task}: ")
    if verbose:
        print(meta["summary"])
    return meta


def _tokenizer_name(tokenizer: str) -> str:
    return os.path.abspath(tokenizer) if os.path.isdir(tokenizer) else tokenizer


def _task_rows(t: Task, task: str, n_train: int, n_val: int, seed: int,
               task_options: dict) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows); train rows that repeat a val question are redrawn."""
    val = t.rows(n_val, f"{seed}-val", **task_options)
    held_out = {r["question"] for r in val}
    train: list[dict] = []
    for k in range(20):
        if len(train) == n_train:
            break
        fresh = t.rows(n_train, f"{seed}-train-{k}", **task_options)
        train += [r for r in fresh if r["question"] not in held_out][:n_train - len(train)]
    if len(train) < n_train:
        raise DataError(f"task {task!r} with options {task_options or 'default'} has too few distinct "
                        f"questions for {n_train} training rows outside {n_val} validation rows; "
                        "widen the task options or lower n_train/n_val.")
    return train, val
