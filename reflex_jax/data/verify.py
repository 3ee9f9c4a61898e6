"""Checks of a prepared directory against what uses it: token ids against a model's vocabulary, and
the identity of the data a run was trained on."""
from __future__ import annotations

import hashlib
import json
from typing import Union

from ..errors import DataError
from .store import TokenData, split_path

# meta.json keys that describe a preparation, not the data (a re-preparation changes them)
_VOLATILE = ("summary", "prepare_seconds")


def check_token_range(data: TokenData, vocab_size: int) -> dict:
    """{split: largest token id}, read from the token files themselves; raise one sentence when an
    id is >= vocab_size (an embedding lookup past the table, which surfaces as a NaN loss) or when
    a file's ids disagree with the largest id its meta.json records.

    Scans every split once (measured: 1 ms per 10M tokens from the page cache, 19 ms from disk)."""
    top = {}
    for split in data.splits:
        top[split] = got = data.max_id(split)
        recorded = data.meta["splits"][split].get("max_id")
        path = split_path(data.directory, split, "tokens.bin")
        if recorded is not None and got != recorded:
            raise DataError(f"{path!r} holds token ids up to {got:,} but its meta.json records "
                            f"{recorded:,}, so the file was changed after it was prepared; prepare "
                            f"{data.directory!r} again.")
        if got >= vocab_size:
            row, pos = data.first_at_least(split, vocab_size)
            raise DataError(f"the {split} split of {data.directory!r} holds token id {got:,} (the "
                            f"first id >= {vocab_size:,} is in row {row:,}, stream position {pos:,}) "
                            f"but the model's vocab_size is {vocab_size:,}; set model.vocab_size to "
                            f"at least {got + 1:,}, or prepare the data with the model's tokenizer.")
    return top


def data_fingerprint(data: Union[TokenData, str]) -> str:
    """16 hex digits that name the prepared data: the same for the same source, tokenizer and options
    (whichever directory they were prepared into), different when any of them or the split sizes
    differ. A run stores it, and compares it on resume."""
    if isinstance(data, str):
        data = TokenData.open(data)
    meta = data.meta
    if meta.get("fingerprint"):
        identity = {"fingerprint": meta["fingerprint"], "dtype": meta["dtype"],
                    "splits": {name: {k: s.get(k) for k in ("rows", "tokens", "answer_tokens")}
                               for name, s in meta["splits"].items()}}
    else:  # a directory made by other tools: all of its meta.json
        identity = {k: v for k, v in meta.items() if k not in _VOLATILE}
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
