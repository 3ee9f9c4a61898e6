"""The five evaluations, each a function of a Scorer (scorer.py), a tokenizer and its inputs, each
returning a JSON-ready dict. docs/study.md#evaluations says what every number means.

* `text_bpb` (bpb and position): bits per byte of whole documents in non-overlapping windows, and
  the same by position in the window;
* `forgetting`: a passage, d tokens of the text that follows it, the passage again: loss on both
  copies by d;
* `recall`: the built-in `kv_recall` rows (data/tasks.py) with every pair of a context asked,
  scored on every answer, by number of pairs and by distance;
* `passkey`: a number hidden at a depth of repetitive filler, then asked for.
"""
from __future__ import annotations

import glob
import math
import os
import random
from typing import Optional, Sequence

import numpy as np

from ..data.encode import RowEncoder
from ..data.tasks import get_task
from ..data.templates import DEFAULT_TEMPLATE, render_prompt
from ..errors import ConfigError, DataError, MissingFileError
from ..text import decode_user_text
from .scorer import Scorer

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------- text

def text_files(paths: Sequence[str]) -> list[str]:
    """The .txt files named by `paths` (files, or directories searched recursively), in order."""
    if not paths:
        raise ConfigError("no --text given; pass a directory of .txt files or .txt files.")
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.txt"), recursive=True))
            if not found:
                raise DataError(f"--text directory {p!r} holds no .txt files; pass a directory "
                                "of .txt files or .txt files.")
            out.extend(found)
        elif os.path.isfile(p):
            if not p.lower().endswith(".txt"):
                raise DataError(f"--text file {p!r} is not a .txt file; pass .txt files or a "
                                "directory of them.")
            out.append(p)
        else:
            raise MissingFileError(f"--text {p!r} does not exist; pass a directory of .txt files "
                                   "or .txt files.")
    return out


def read_documents(paths: Sequence[str], tok) -> list[dict]:
    """Each .txt file as one document: its path, UTF-8 byte count and token ids (no specials)."""
    docs = []
    for path in text_files(paths):
        with open(path, "rb") as f:
            text = decode_user_text(f.read(), f"--text file {path!r}", DataError)
        if text:
            docs.append({"path": path, "bytes": len(text.encode("utf-8")),
                         "ids": np.asarray(tok.encode(text), np.int64)})
    if not docs:
        raise DataError(f"the --text files ({', '.join(map(repr, paths))}) hold no text; give "
                        "non-empty .txt files.")
    return docs


def text_windows(docs: list[dict], bos_id: int, block_size: int,
                 max_windows: Optional[int] = None) -> tuple[list[np.ndarray], int]:
    """Each document as bos + its ids, cut into windows of block_size + 1 tokens that start every
    block_size tokens (a window's last token is the next one's first): every token of the text is
    a target exactly once, predicted from the tokens before it in its window only. Returns the
    rows and how many documents they came from (`max_windows`: the first windows only)."""
    rows = []
    for n, doc in enumerate(docs, 1):
        stream = np.concatenate([[bos_id], doc["ids"]])
        for start in range(0, len(stream) - 1, block_size):
            rows.append(stream[start:start + block_size + 1])
            if max_windows is not None and len(rows) >= max_windows:
                return rows, n
    return rows, len(docs)


def text_bpb(scorer: Scorer, docs: list[dict], byte_lengths: np.ndarray, bos_id: int,
             block_size: int, buckets: int = 8, max_windows: Optional[int] = None) -> tuple:
    """({"bpb", ...} over the whole text, {"buckets": [...]} by position in the window)."""
    rows, n_docs = text_windows(docs, bos_id, block_size, max_windows)
    s = scorer(rows)
    targets = np.zeros(s.ce.shape, np.int64)
    for i, r in enumerate(rows):
        targets[i, :len(r) - 1] = r[1:]
    nbytes = np.where(s.valid, byte_lengths[targets], 0)
    ce = np.where(s.valid, s.ce, 0.0)
    n_tokens = int(s.valid.sum())
    whole = {"bpb": _bpb(ce.sum(), nbytes.sum()), "loss": float(ce.sum() / n_tokens),
             "tokens": n_tokens, "bytes": int(nbytes.sum()), "windows": len(rows),
             "documents": n_docs}
    n = max(1, min(buckets, block_size))
    edges = np.linspace(0, block_size, n + 1).round().astype(int)
    curve = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        v = s.valid[:, lo:hi]
        curve.append({"start": int(lo), "stop": int(hi), "tokens": int(v.sum()),
                      "loss": float(ce[:, lo:hi].sum() / max(v.sum(), 1)),
                      "bpb": _bpb(ce[:, lo:hi].sum(), nbytes[:, lo:hi].sum())})
    return whole, {"buckets": curve}


def _bpb(ce_nats: float, n_bytes: float) -> Optional[float]:
    return float(ce_nats / (LN2 * n_bytes)) if n_bytes > 0 else None


# ---------------------------------------------------------------------------------- forgetting

def default_passage(block_size: int) -> int:
    return max(1, block_size // 8)


def default_distances(block_size: int, passage: int) -> list[int]:
    """0, the powers of two from 8 that fit, and the longest distance that fits."""
    top = block_size - 2 * passage
    out = [0] + [2 ** k for k in range(3, 32) if 2 ** k < top]
    return sorted(set(out + [top])) if top > 0 else [0]


def forgetting(scorer: Scorer, docs: list[dict], bos_id: int, block_size: int, passage: int,
               distances: Sequence[int], samples: int, seed: int = 0) -> dict:
    """Rows bos + passage + filler[:d] + passage, the filler being the text that follows the
    passage in the source; each sample's passage and filler are the same for every d. Control
    rows replace the first copy by the `passage` tokens that precede the passage in the source,
    so that copy 2 sits at the same position after the same filler, never seen before."""
    if passage < 1 or 2 * passage > block_size:
        raise ConfigError(f"--passage {passage} must be between 1 and block_size / 2 = "
                          f"{block_size // 2} (two copies fit in one window).")
    top = block_size - 2 * passage
    bad = [d for d in distances if d < 0 or d > top]
    if bad:
        raise ConfigError(f"forgetting distance {bad[0]} needs 1 + 2*{passage} + {bad[0]} = "
                          f"{1 + 2 * passage + bad[0]} tokens in one window but the model's "
                          f"block_size={block_size} holds {block_size + 1}; ask for distances "
                          f"0..{max(top, 0)} or a shorter --passage.")
    span = 2 * passage + max(distances)  # what precedes the passage, the passage, the filler
    stream = np.concatenate([d["ids"] for d in docs])
    if len(stream) < span:
        raise DataError(f"the --text files hold {len(stream):,} tokens but forgetting needs "
                        f"{span:,} in a row (2 passages and the longest filler); give more text "
                        "or smaller distances.")
    starts = passage + np.random.default_rng([seed, 1]).integers(0, len(stream) - span + 1,
                                                                   samples)
    rows = []
    for d in distances:
        for o in starts:
            p, filler = stream[o:o + passage], stream[o + passage:o + passage + d]
            rows.append(np.concatenate([[bos_id], p, filler, p]))
            rows.append(np.concatenate([[bos_id], stream[o - passage:o], filler, p]))
    s = scorer(rows)
    out = []
    for i, d in enumerate(distances):
        copy, control = slice(2 * i * samples, 2 * (i + 1) * samples, 2), \
            slice(2 * i * samples + 1, 2 * (i + 1) * samples, 2)
        ce, hit = s.ce[copy], s.hit[copy]
        c1, c2 = slice(0, passage), slice(passage + d, 2 * passage + d)
        first, second = ce[:, c1].mean(axis=1), ce[:, c2].mean(axis=1)  # per passage
        unseen = s.ce[control][:, c2].mean(axis=1)
        out.append({"distance": int(d), "copy1_loss": float(first.mean()),
                    "copy2_loss": float(second.mean()), "control_loss": float(unseen.mean()),
                    "drop": float((first - second).mean()), "drop_se": _se(first - second),
                    "remembered": float((unseen - second).mean()),
                    "remembered_se": _se(unseen - second),
                    "copy1_accuracy": float(hit[:, c1].mean()),
                    "copy2_accuracy": float(hit[:, c2].mean())})
    return {"passage": passage, "samples": samples, "distances": out}


def _se(x: np.ndarray) -> Optional[float]:
    """The standard error of the mean of paired differences (None for one sample)."""
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


# ------------------------------------------------------------------------------------- recall

def _answer_rows(tok, prompts: Sequence[str], answers: Sequence[str], eos: bool):
    """(rows, answer target masks): bos + tokens of prompt + answer (tokenised whole, as training
    rows are) [+ eos]; the mask marks the targets that are answer tokens (and the eos)."""
    encoded = RowEncoder(tok).encode([p + a for p, a in zip(prompts, answers)],
                                     [[(len(p), len(p) + len(a))] for p, a in zip(prompts, answers)])
    rows, masks = [], []
    for ids, answer in encoded:
        rows.append(np.concatenate([[tok.bos_id], ids] + ([[tok.eos_id]] if eos else [])))
        masks.append(np.concatenate([[False], answer] + ([[True]] if eos else [])).astype(bool))
    return rows, masks


def recall_contexts(n_pairs: int, samples: int, seed: int, max_value: int) -> list[list[dict]]:
    """`samples` kv_recall contexts of `n_pairs` pairs, each asked at every distance 1..n_pairs:
    the task's own rows, one per distance, drawn from the same generator state."""
    task = get_task("kv_recall")
    options = [task.options(n_pairs=n_pairs, distance=d, max_value=max_value)
               for d in range(1, n_pairs + 1)]
    rng = random.Random(f"evals:kv_recall:{seed}:{n_pairs}")
    contexts = []
    for _ in range(samples):
        state = rng.getstate()
        rows = []
        for opts in options:
            rng.setstate(state)
            rows.append(task._row(rng, opts))
        contexts.append(rows)
    return contexts


def multi_query_rows(n_pairs: int, samples: int, seed: int, max_value: int) -> list[dict]:
    """`samples` kv_recall rows of `n_pairs` pairs that ask every pair, in random order, each
    question followed by its answer (the task's `queries` format)."""
    task = get_task("kv_recall")
    opts = task.options(n_pairs=n_pairs, max_value=max_value, queries=n_pairs)
    rng = random.Random(f"evals:kv_recall_multi:{seed}:{n_pairs}")
    return [task._row(rng, opts) for _ in range(samples)]


def _multi_answer_rows(tok, prompts: Sequence[str], rows: Sequence[dict]):
    """(token rows, [(row index, target mask, distance)] one per answer): each answer's mask marks
    its value's tokens (and, for the last, the closing eos)."""
    encoder, token_rows, answers = RowEncoder(tok), [], []
    for i, (p, r) in enumerate(zip(prompts, rows)):
        spans = r.get("answer_spans") or [[0, len(r["answer"])]]
        encoded = encoder.encode([p + r["answer"]] * len(spans),
                                 [[(len(p) + a, len(p) + b)] for a, b in spans])
        ids = encoded[0][0]
        token_rows.append(np.concatenate([[tok.bos_id], ids, [tok.eos_id]]))
        for j, ((_, mask), d) in enumerate(zip(encoded, r.get("distances") or [r["distance"]])):
            answers.append((i, np.concatenate([[False], mask, [j == len(spans) - 1]]), int(d)))
    return token_rows, answers


def recall_pairs_fit(tok, template: str, block_size: int, n_pairs: int, max_value: int,
                     multi: bool = False) -> int:
    """The most tokens a row of `n_pairs` pairs takes (over a few sampled contexts)."""
    if multi:
        rows = multi_query_rows(n_pairs, 8, 0, max_value)
        ids, _ = _multi_answer_rows(tok, [render_prompt(r["question"], template) for r in rows], rows)
        return max(len(r) for r in ids)
    rows = [r for c in recall_contexts(n_pairs, 8, 0, max_value) for r in c]
    prompts = [render_prompt(r["question"], template) for r in rows]
    ids, _ = _answer_rows(tok, prompts, [r["answer"] for r in rows], eos=True)
    return max(len(r) for r in ids)


def recall(scorer: Scorer, tok, block_size: int, pairs: Sequence[int], samples: int,
           template: str = DEFAULT_TEMPLATE, max_value: int = 9, seed: int = 0,
           multi: bool = False) -> dict:
    """Exact match (every answer token and the closing eos the argmax) and answer loss of every
    answer, by number of pairs and by distance (k: the pair said k pairs before the question).
    `multi`: each context is one row asking every pair in turn (the task's `queries` format, what
    a run trained with queries > 1 saw); an answer counts when its value's tokens are the argmax
    (the last one's eos too)."""
    out = []
    for n in pairs:
        if multi:
            rows = multi_query_rows(n, samples, seed, max_value)
            prompts = [render_prompt(r["question"], template) for r in rows]
            ids, answers = _multi_answer_rows(tok, prompts, rows)
        else:
            rows = [r for c in recall_contexts(n, samples, seed, max_value) for r in c]
            prompts = [render_prompt(r["question"], template) for r in rows]
            ids, masks = _answer_rows(tok, prompts, [r["answer"] for r in rows], eos=True)
            answers = [(i, m, r["distance"]) for i, (m, r) in enumerate(zip(masks, rows))]
        longest = max(len(r) for r in ids)
        if longest > block_size + 1:
            raise ConfigError(f"kv recall rows with {n} pairs take up to {longest} tokens but the "
                              f"model's block_size={block_size} holds {block_size + 1}; ask for "
                              "fewer --pairs.")
        s = scorer(ids)
        em, loss = _answer_scores(s, [m for _, m, _ in answers], [i for i, _, _ in answers])
        dist = np.array([d for _, _, d in answers])
        by = [{"distance": int(d), "exact_match": float(em[dist == d].mean()),
               "answer_loss": float(loss[dist == d].mean()), "answers": int((dist == d).sum())}
              for d in range(1, n + 1)]
        out.append({"n_pairs": int(n), "exact_match": float(em.mean()),
                    "answer_loss": float(loss.mean()), "answers": len(answers), "by_distance": by})
    return {"template": template, "max_value": max_value, "contexts": samples,
            "format": "multi" if multi else "single", "pairs": out}


def _answer_scores(s, masks, rows: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per mask (over row rows[k], default row k): whether every answer target was the argmax, and
    the answer targets' mean CE."""
    em, loss = np.zeros(len(masks), bool), np.zeros(len(masks))
    for k, m in enumerate(masks):
        i = k if rows is None else rows[k]
        t = m[1:]  # target t is token t + 1
        em[k] = bool(s.hit[i, :len(t)][t].all())
        loss[k] = float(s.ce[i, :len(t)][t].mean())
    return em, loss


# ------------------------------------------------------------------------------------ passkey

FILLER = ("Трава зелёная. ", "Небо голубое. ", "Солнце жёлтое. ", "Вот так. ", "Туда и обратно. ")
NEEDLE = "Пароль: {key}. Запомни его. {key} — это пароль. "
QUESTION = "Какой пароль? Пароль: "


def passkey(scorer: Scorer, tok, block_size: int, depths: Sequence[float], samples: int,
            digits: int = 5, seed: int = 0) -> dict:
    """Accuracy of the key's tokens (all the argmax: what greedy decoding answers) by depth: the
    needle sits after that fraction of the filler sentences that fit in one window."""
    if digits < 1:
        raise ConfigError(f"--passkey_digits {digits} must be at least 1.")
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise ConfigError(f"passkey depth {bad[0]:g} must be a fraction between 0 and 1 (e.g. "
                          "--depths 0,0.25,0.5,0.75,1).")
    rng = np.random.default_rng([seed, 2])
    keys = [str(k) for k in rng.integers(10 ** (digits - 1), 10 ** digits, samples)]
    units = _filler_units(tok, block_size, keys)
    while True:  # BPE may join the pieces a token longer than they measured apart
        rows, masks, needles = _passkey_rows(tok, depths, keys, units)
        longest = max(len(r) for r in rows)
        if longest <= block_size + 1:
            break
        if units == 0:
            raise ConfigError(f"passkey rows take {longest} tokens but the model's block_size="
                              f"{block_size} holds {block_size + 1}; passkey needs a larger block.")
        units -= 1
    s = scorer(rows)
    em, loss = _answer_scores(s, masks)
    token_acc = np.array([s.hit[i, :len(m) - 1][m[1:]].mean() for i, m in enumerate(masks)])
    out = []
    for i, depth in enumerate(depths):
        b = slice(i * samples, (i + 1) * samples)
        out.append({"depth": float(depth), "accuracy": float(em[b].mean()),
                    "token_accuracy": float(token_acc[b].mean()),
                    "answer_loss": float(loss[b].mean()), "needle_position": needles[i],
                    "length": float(np.mean([len(r) for r in rows[b]]))})
    return {"digits": digits, "samples": samples, "filler_sentences": units, "depths": out}


def _passkey_rows(tok, depths, keys, units: int):
    prompts, answers, needles = [], [], []
    for depth in depths:
        before = int(round(depth * units))
        needles.append(1 + len(tok.encode(filler(0, before))))  # bos + the filler before it
        for key in keys:
            prompts.append(filler(0, before) + NEEDLE.format(key=key) + filler(before, units)
                           + QUESTION)
            answers.append(key)
    rows, masks = _answer_rows(tok, prompts, answers, eos=False)
    return rows, masks, needles


def filler(start: int, stop: int) -> str:
    """Sentences start..stop-1 of the endless repetition of FILLER."""
    return "".join(FILLER[i % len(FILLER)] for i in range(start, stop))


def _filler_units(tok, block_size: int, keys: Sequence[str]) -> int:
    """The most filler sentences a passkey row of the longest key fits in block_size + 1
    tokens."""
    key = max(keys, key=lambda k: len(tok.encode(k)))

    def length(n: int) -> int:
        return 1 + len(tok.encode(NEEDLE.format(key=key) + filler(0, n) + QUESTION + key))
    if length(0) > block_size + 1:
        raise ConfigError(f"a passkey row without filler takes {length(0)} tokens but the model's "
                          f"block_size={block_size} holds {block_size + 1}; passkey needs a "
                          "larger block (or fewer --passkey_digits).")
    cycle = max(1, len(tok.encode(filler(0, len(FILLER)))))  # tokens of one round of sentences
    n = max(0, (block_size + 1 - length(0)) * len(FILLER) // cycle)
    while n > 0 and length(n) > block_size + 1:
        n -= 1
    while length(n + 1) <= block_size + 1:
        n += 1
    return n
