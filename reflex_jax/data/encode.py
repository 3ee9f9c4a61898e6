"""Tokenising rows: render with the template, tokenise in batches, mark the answer, write."""
from __future__ import annotations

import collections
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .templates import BadRow, Template


def token_dtype(max_id: int) -> np.dtype:
    """uint16 when every id fits (<= 65535), else uint32."""
    return np.dtype(np.uint16) if max_id <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def max_token_id(tok) -> int:
    return max(tok.vocab_size - 1, tok.bos_id, tok.eos_id, tok.pad_id)


Spans = Optional[Sequence[tuple[int, int]]]  # [start, end) characters of the answer; None: all


class RowEncoder:
    """Tokenises whole rendered rows (so the ids equal a direct tokenisation of the text) and marks as
    answer every token that overlaps the answer's characters (one span, or several: a multi-query
    row's values)."""

    def __init__(self, tok):
        from .tokenizer import ByteTokenizer
        self.tok = tok
        self.is_bytes = isinstance(tok, ByteTokenizer)
        # the Rust `tokenizers` backend batch-encodes in parallel threads and gives char offsets
        self.backend = getattr(getattr(tok, "tok", None), "backend_tokenizer", None)

    def encode(self, texts: list[str], answer_spans: list[Spans]):
        """[(ids int64, answer mask bool)] without bos/eos; spans None: the whole text counts."""
        if self.is_bytes:
            return [self._encode_bytes(text, spans) for text, spans in zip(texts, answer_spans)]
        if self.backend is not None:
            return self._encode_backend(texts, answer_spans)
        return self._encode_generic(texts, answer_spans)

    @staticmethod
    def _encode_bytes(text: str, spans: Spans):
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
        if spans is None:
            return ids, np.ones(len(ids), bool)
        mask = np.zeros(len(ids), bool)
        for a, b in spans:
            mask[len(text[:a].encode("utf-8")):len(text[:b].encode("utf-8"))] = True
        return ids, mask

    def _encode_backend(self, texts, answer_spans):
        out = []
        for enc, spans in zip(self.backend.encode_batch(texts, add_special_tokens=False), answer_spans):
            ids = np.asarray(enc.ids, np.int64)
            if spans is None:
                out.append((ids, np.ones(len(ids), bool)))
                continue
            starts = np.fromiter((s for s, _ in enc.offsets), np.int64, len(ids))
            ends = np.fromiter((e for _, e in enc.offsets), np.int64, len(ids))
            mask = np.zeros(len(ids), bool)
            for a, b in spans:
                mask |= (ends > a) & (starts < b)
            out.append((ids, mask))
        return out

    def _encode_generic(self, texts, answer_spans):
        """Any other tokenizer: a span boundary at character c falls after the tokens that the
        whole text's tokens share with the tokens of text[:c] (their longest common prefix)."""
        full = self.tok.encode_batch(texts)
        out = []
        for text, ids, spans in zip(texts, full, answer_spans):
            ids = np.asarray(ids, np.int64)
            if spans is None:
                out.append((ids, np.ones(len(ids), bool)))
                continue
            bounds = sorted({c for span in spans for c in span if c < len(text)})
            cut = dict(zip(bounds, (_common_prefix(p, ids) for p in self.tok.encode_batch(
                [text[:c] for c in bounds]))))
            cut[len(text)] = len(ids)
            mask = np.zeros(len(ids), bool)
            for a, b in spans:
                mask[cut[a]:cut[min(b, len(text))]] = True
            out.append((ids, mask))
        return out


def _common_prefix(p, ids) -> int:
    k = 0
    while k < min(len(p), len(ids)) and p[k] == ids[k]:
        k += 1
    return k


def _rendered(items: Iterable[Any], template: Optional[Template], skipped: collections.Counter):
    """(source row, text, answer spans) of each item; text None for a bad row, which is counted in
    `skipped`. A .txt document (template None) is its own text and has no answer spans. A row's
    "answer_spans" ([start, end) characters within its answer) keep the loss to those parts."""
    for source_row, item in enumerate(items):
        if isinstance(item, BadRow):
            skipped[item.reason] += 1
            yield source_row, None, None
        elif template is None:
            yield source_row, item, None
        else:
            try:
                values = template.values(item)
            except BadRow as bad:
                skipped[bad.reason] += 1
                yield source_row, None, None
                continue
            prompt = template.prompt(values)
            answer = values[template.answer_field]
            within = item.get("answer_spans") if isinstance(item, dict) else None
            spans = [(len(prompt) + a, len(prompt) + b) for a, b in (within or [(0, len(answer))])]
            yield source_row, prompt + answer, spans


def tokenise_into(writer, items: Iterable[Any], *, tok, template: Optional[Template],
                  skipped: collections.Counter, long_rows: str = "keep",
                  max_tokens: Optional[int] = None, batch_rows: int = 1024) -> dict:
    """Render, tokenise (in batches) and write rows to `writer`; bad rows are counted in `skipped`.

    Returns the long-row policy and count ("policy", "max_tokens", "rows"), the number of source
    rows seen ("seen"), the longest row ("longest", in tokens) and the answer tokens of dropped rows
    ("dropped_answer_tokens"). Long-row handling applies to template rows only: .txt documents
    (template None) are long and are streamed whole.
    """
    encoder = RowEncoder(tok)
    bos, eos = np.array([tok.bos_id]), np.array([tok.eos_id])
    limit = max_tokens if template is not None else None
    stats = {"rows": 0, "longest": 0, "dropped_answer_tokens": 0}
    pending: list[tuple[int, str, Spans]] = []
    pending_chars = 0
    seen = 0  # source rows, bad ones included

    def flush():
        encoded = encoder.encode([p[1] for p in pending], [p[2] for p in pending])
        for (source_row, _, spans), (ids, answer) in zip(pending, encoded):
            ids = np.concatenate([bos, ids, eos])
            # bos is prompt (or text) and eos belongs to the answer: the model must learn to stop
            mask = np.concatenate([[spans is None], answer, [True]])
            _write_row(writer, ids, mask, source_row, limit, long_rows, skipped, stats)
        pending.clear()

    for source_row, text, spans in _rendered(items, template, skipped):
        seen = source_row + 1
        if text is None:
            continue
        pending.append((source_row, text, spans))
        pending_chars += len(text)
        if len(pending) >= batch_rows or pending_chars >= 1 << 24:
            flush()
            pending_chars = 0
    if pending:
        flush()
    return {"policy": long_rows, "max_tokens": max_tokens, **stats, "seen": seen}


def _write_row(writer, ids: np.ndarray, mask: np.ndarray, source_row: int, limit: Optional[int],
               long_rows: str, skipped: collections.Counter, stats: dict) -> None:
    """Write one row under the long-row policy, counting it in `stats` when longer than `limit`."""
    stats["longest"] = max(stats["longest"], len(ids))
    if limit is None or len(ids) <= limit:
        writer.add(ids, mask, source_row)
        return
    stats["rows"] += 1
    if long_rows == "drop":
        skipped["too_long"] += 1
        stats["dropped_answer_tokens"] += int(mask.sum())
    elif long_rows == "split":  # pieces of max_tokens; the loader joins them again (windows.py)
        for a in range(0, len(ids), limit):
            writer.add(ids[a:a + limit], mask[a:a + limit], source_row)
    else:
        writer.add(ids, mask, source_row)
