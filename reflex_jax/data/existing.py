"""What an output directory already holds: the same preparation is reused, another one is replaced
only when asked (overwrite=True, `--overwrite`), so that a run trained on a directory never finds
other data there without a word. A built-in task directory is the exception: it is a pure function
of its meta.json, so prepare_task regenerates it with other arguments (nothing is lost)."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import DataError
from .store import TokenData, read_data_meta

_OPTION_KEYS = ("format_version", "kind", "tokenizer", "template", "fields", "source",
                "val_fraction", "seed", "long_rows", "val_source")


def preparation_inputs(fields: dict) -> dict:
    """The inputs that identify a preparation, in the form meta.json stores them."""
    return json.loads(json.dumps(fields, sort_keys=True, ensure_ascii=False, default=list))


def _inputs_of(meta: dict) -> dict:
    """preparation_inputs of the preparation an existing meta.json describes."""
    if meta.get("task"):
        return {"task_fingerprint": meta.get("fingerprint")}
    fields = {k: meta.get(k) for k in _OPTION_KEYS}
    long_rows = meta.get("long_rows")
    fields["long_rows"] = ({"policy": long_rows.get("policy"), "max_tokens": long_rows.get("max_tokens")}
                           if long_rows else None)
    return preparation_inputs(fields)


def up_to_date(out_dir: str, inputs: dict, verbose: bool) -> Optional[dict]:
    """out_dir's meta when it already holds this preparation, intact; else None."""
    old = read_data_meta(out_dir)
    if old is None or _inputs_of(old) != inputs:
        return None
    try:
        TokenData.open(out_dir)  # the token files are there too
    except (OSError, ValueError):
        return None  # damaged: rebuild
    if verbose:
        print(f"{out_dir}: up to date ({old.get('summary', '')})")
    return old


def check_replace(out_dir: str, inputs: dict, overwrite: bool) -> None:
    """Raise one sentence when out_dir holds another preparation that may not be replaced."""
    old = read_data_meta(out_dir)
    if old is None or overwrite or _inputs_of(old) == inputs:
        return  # nothing there, asked to replace, or the same preparation (damaged): rebuild
    if old.get("task") and "task_fingerprint" in inputs:
        return  # another built-in task preparation: regenerated from arguments, nothing lost
    raise DataError(f"{out_dir!r} already holds data prepared from {_difference(old, inputs)}; pass "
                    "--overwrite (overwrite=True) to replace it, or choose another --out.")


def _difference(old: dict, inputs: dict) -> str:
    if old.get("task"):
        return f"the built-in task {old['task']!r}"
    if "task_fingerprint" in inputs:
        return f"{_describe_source(old.get('source'))}, not a built-in task"
    old_inputs = _inputs_of(old)
    if old_inputs["format_version"] != inputs["format_version"]:
        return f"an older format (version {old_inputs['format_version']})"
    if old_inputs["source"] != inputs["source"]:
        if _paths(old_inputs["source"]) == _paths(inputs["source"]) and _paths(inputs["source"]):
            return f"another version of {_describe_source(old.get('source'))} (its content changed)"
        return f"another source ({_describe_source(old.get('source'))})"
    if old_inputs["tokenizer"] != inputs["tokenizer"]:
        return f"another tokenizer ({old_inputs['tokenizer']})"
    changed = [k for k in _OPTION_KEYS if old_inputs.get(k) != inputs.get(k)]
    return f"other options ({', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'})"


def _paths(source) -> list:
    return [f.get("path") for f in (source or {}).get("files") or []]


def _describe_source(source) -> str:
    source = source or {}
    if source.get("hub_id"):
        return f"HF dataset {source['hub_id']} split {source.get('split')}"
    files = source.get("files") or []
    if not files:
        return "an unnamed source"
    first = os.path.basename(files[0].get("path", "?"))
    return f"{first}" + (f" and {len(files) - 1} more files" if len(files) > 1 else "")
