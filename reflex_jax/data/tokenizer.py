"""Tokenizers behind one small interface: `bytes` (no files) or any HF tokenizer (hub id or dir).

Every tokenizer exposes `name`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `encode(str) -> list[int]`,
`encode_batch(list[str])`, `decode(ids) -> str`. `name` is what run metadata stores, so that
`load_tokenizer(name)` gives the same tokenizer back.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import MissingFileError, TokenizerError

DEFAULT_TOKENIZER = "ai-forever/rugpt3large_based_on_gpt2"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus <pad>=256, <s>=257, </s>=258. Needs no files and no network."""
    name = "bytes"
    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer; special ids are the tokenizer's own (not the model config's)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer  # heavy import, only when needed
        self.name = os.path.abspath(name) if os.path.isdir(name) else name
        try:
            self.tok = AutoTokenizer.from_pretrained(self.name)
        except OSError as e:
            raise MissingFileError(
                f"tokenizer {name!r} could not be loaded: it is neither a local tokenizer directory "
                "nor a reachable HF hub id (use a local dir, or 'bytes' for the built-in byte "
                f"tokenizer). ({str(e).splitlines()[0]})") from None
        self.vocab_size = len(self.tok)
        self.bos_id = self._special("bos_token_id")
        self.eos_id = self._special("eos_token_id")
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id

    def _special(self, attr: str) -> int:
        value = getattr(self.tok, attr)
        if value is None:
            raise TokenizerError(f"tokenizer {self.name!r} defines no {attr.replace('_id', '')}; "
                             "pick a tokenizer with bos/eos special tokens.")
        return int(value)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(name: str):
    """`bytes`, a local tokenizer directory, or an HF hub id."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)
