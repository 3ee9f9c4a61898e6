"""Tokenizers behind one small interface: `bytes` (no files) or any HF tokenizer (hub id or dir).

Every tokenizer exposes `name`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `encode(str) -> list[int]`,
`encode_batch(list[str])`, `decode(ids) -> str`, and `byte_lengths()`: the UTF-8 bytes each token id
stands for (bits per byte divides by them). `name` is what run metadata stores, so that
`load_tokenizer(name)` gives the same tokenizer back.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

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

    def byte_lengths(self) -> np.ndarray:
        """int32 [259]: 1 for each byte, 0 for pad, bos and eos."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)


class HFTokenizer:
    """A `transformers` tokenizer; special ids are the tokenizer's own (not the model config's)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer  # heavy import, only when needed
        self.name = os.path.abspath(name) if os.path.isdir(name) else name
        if not os.path.isdir(name):
            from ..hub_access import OFFLINE_HINT, unreachable_reason
            why = unreachable_reason()
            if why:
                raise MissingFileError(
                    f"tokenizer {name!r} is not a local tokenizer directory, and the HF hub cannot "
                    f"be reached to fetch it ({why}); use a local dir, 'bytes' for the built-in "
                    f"byte tokenizer, or {OFFLINE_HINT}.")
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

    def byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: the UTF-8 bytes of each token, 0 for special tokens and unused ids.

        Byte-level BPE (GPT-2, rugpt3): a token's string spells its bytes one character each in
        the byte alphabet, so its length is exact, partial multi-byte characters included. Other
        tokenizers (and added tokens): len(decode([id]) in UTF-8), which misses what decoding a
        lone token drops (e.g. SentencePiece's word-initial space), so their bits per byte are an
        upper bound.
        """
        out = np.zeros(self.vocab_size, np.int32)
        special = set(self.tok.all_special_ids)
        added = {i: t.content for i, t in self.tok.added_tokens_decoder.items() if not t.special}
        pieces = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        alphabet = BYTE_ALPHABET if _is_byte_level(self.tok) else frozenset()
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                continue
            if i in added:  # added tokens hold their text as it is, not in the byte alphabet
                out[i] = len(added[i].encode("utf-8"))
            elif alphabet and all(ch in alphabet for ch in piece):
                out[i] = len(piece)
            else:
                out[i] = len(self.tok.decode([i]).encode("utf-8"))
        return out


def _byte_alphabet() -> frozenset:
    """The 256 characters byte-level BPE writes bytes with: the printable Latin-1 bytes stand for
    themselves, every other byte b for chr(256 + its rank among those others)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = [b for b in range(256) if b not in printable]
    return frozenset([chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))])


BYTE_ALPHABET = _byte_alphabet()


def _is_byte_level(hf_tok) -> bool:
    """Whether an HF tokenizer decodes with the byte-level decoder (its tokens spell bytes)."""
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        return False
    return "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))


def load_tokenizer(name: str):
    """`bytes`, a local tokenizer directory, or an HF hub id."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)
