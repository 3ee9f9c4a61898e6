"""Evaluations of any run or params directory: bits per byte of a text set (whole, and by position
in the window), a forgetting curve, key-value recall on every answer, and passkey retrieval.

    python -m reflex_jax.evals --run runs/x --text ../shared/data/ru_text/turgenev --json out.json

`evaluate(run, evals, text=...)` returns the JSON dict; every evaluation scores its rows through
one `Scorer` (scorer.py: batched, jitted forward passes), whose model is the run's decoder.
docs/study.md#evaluations says what each number means.
"""
from __future__ import annotations

import json
import time
from typing import Optional, Sequence

from ..errors import ConfigError, UsageError
from . import suite
from .scorer import Scorer, Scores, decoder_apply

EVALS = ("bpb", "position", "forgetting", "recall", "passkey")
TEXT_EVALS = ("bpb", "position", "forgetting")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RECALL_PAIRS = (1, 2, 4, 8, 16, 32)
RECALL_FORMATS = ("auto", "single", "multi")

__all__ = ["EVALS", "Scorer", "Scores", "decoder_apply", "evaluate", "evaluate_model",
           "parse_evals", "suite"]


def parse_evals(text: Optional[str], have_text: bool) -> list[str]:
    """The evaluations named in `text` (comma-separated), in EVALS order; default: all five with
    --text, recall and passkey without."""
    if not text:
        return list(EVALS if have_text else ("recall", "passkey"))
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVALS]
    if unknown or not names:
        raise UsageError(f"--evals {text!r} names {unknown[0] if unknown else 'nothing'}; choose "
                         f"from {','.join(EVALS)}.")
    need = [n for n in names if n in TEXT_EVALS]
    if need and not have_text:
        raise UsageError(f"--evals {need[0]} needs --text (a directory of .txt files or .txt "
                         f"files); pass --text or leave {need[0]} out of --evals.")
    return [n for n in EVALS if n in names]


def run_task_options(run: str) -> dict:
    """The built-in task options of the run's training (config.json data.task_options) when it
    trained on kv_recall (or mix), else {}."""
    from .. import storage
    path = storage.join(storage.resolve(run), "config.json")
    if not storage.exists(path):
        return {}
    data = json.loads(storage.read_text(path)).get("data", {})
    if data.get("task") not in ("kv_recall", "mix"):
        return {}
    return dict(data.get("task_options") or {})


def evaluate(run: str, evals: Sequence[str], *, text: Sequence[str] = (), tokenizer=None,
             step: Optional[int] = None, which: str = "best", batch_size: Optional[int] = None,
             log=print, **options) -> dict:
    """Load the run (checkpoint.load_params) and its tokenizer (meta.json, or `tokenizer`), then
    `evaluate_model` with its decoder. The result records the run, model and tokenizer."""
    from ..checkpoint import load_params, read_checkpoint_meta
    from ..data import load_tokenizer
    cfg, params = load_params(run, step=step, which=which, log=log)
    meta = read_checkpoint_meta(run)
    name = tokenizer or meta.get("tokenizer")
    if not name:
        raise UsageError(f"{run!r} names no tokenizer in meta.json; pass --tokenizer (bytes or a "
                         "tokenizer directory).")
    tok = load_tokenizer(name)
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer {name!r} has {tok.vocab_size} tokens but the model in {run!r} "
                         f"has vocab_size={cfg.vocab_size}; pass the tokenizer the model was "
                         "trained with (--tokenizer).")
    task = run_task_options(run)
    options.setdefault("template", meta.get("template") or suite.DEFAULT_TEMPLATE)
    if "max_value" in task:
        options.setdefault("max_value", task["max_value"])
    scorer = Scorer(decoder_apply(cfg), params, block_size=cfg.block_size,
                    vocab_size=cfg.vocab_size, pad_id=_pad(tok, cfg), batch_size=batch_size)
    out = {"run": run, "step": step, "which": None if step is not None else which,
           "tokenizer": tok.name,
           "model": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                  "vocab_size", "head_plan", "value_residual")}}
    out.update(evaluate_model(scorer, tok, cfg.block_size, evals, text=text,
                              run_pairs=task.get("n_pairs"), run_queries=int(task.get("queries") or 1),
                              log=log, **options))
    return out


def _pad(tok, cfg) -> int:
    return tok.pad_id if tok.pad_id < cfg.vocab_size else 0


def evaluate_model(scorer: Scorer, tok, block_size: int, evals: Sequence[str], *,
                   text: Sequence[str] = (), samples: int = 32, buckets: int = 8,
                   max_windows: Optional[int] = None, passage: Optional[int] = None,
                   distances: Optional[Sequence[int]] = None,
                   pairs: Optional[Sequence[int]] = None, run_pairs: Optional[int] = None,
                   recall_format: str = "auto", run_queries: int = 1,
                   depths: Sequence[float] = DEFAULT_DEPTHS, digits: int = 5,
                   template: str = suite.DEFAULT_TEMPLATE, max_value: int = 9, seed: int = 0,
                   log=print) -> dict:
    """{eval name: result, "seconds": {eval name (bpb and position: "text"): wall seconds}} for
    `scorer`'s model. `recall_format` "auto" asks recall in the multi-query format when the run
    trained on it (`run_queries` > 1), else one pair a row."""
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1.")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--max_windows {max_windows} must be at least 1.")
    out, seconds = {}, {}
    docs = suite.read_documents(text, tok) if any(e in TEXT_EVALS for e in evals) else None
    byte_lengths = tok.byte_lengths()
    if len(byte_lengths) < scorer.vocab_size:
        import numpy as np
        byte_lengths = np.pad(byte_lengths, (0, scorer.vocab_size - len(byte_lengths)))
    t0 = time.perf_counter()
    if "bpb" in evals or "position" in evals:
        whole, curve = suite.text_bpb(scorer, docs, byte_lengths, tok.bos_id, block_size, buckets,
                                      max_windows)
        whole["text"] = [d["path"] for d in docs][:whole["documents"]]
        for name, result in (("bpb", whole), ("position", curve)):
            if name in evals:
                out[name] = result
        seconds["text"] = _since(t0)  # one pass serves both
        _say(log, out)
    if "forgetting" in evals:
        t0 = time.perf_counter()
        p = passage if passage is not None else suite.default_passage(block_size)
        ds = list(distances) if distances else suite.default_distances(block_size, p)
        out["forgetting"] = suite.forgetting(scorer, docs, tok.bos_id, block_size, p, ds, samples,
                                             seed)
        seconds["forgetting"] = _since(t0)
        _say(log, {"forgetting": out["forgetting"]})
    if "recall" in evals:
        t0 = time.perf_counter()
        if recall_format not in RECALL_FORMATS:
            raise ConfigError(f"--recall_format {recall_format!r} is not one of "
                              f"{', '.join(RECALL_FORMATS)}.")
        multi = recall_format == "multi" or (recall_format == "auto" and run_queries > 1)
        ps = list(pairs) if pairs else _default_pairs(tok, template, block_size, max_value,
                                                      run_pairs, multi)
        out["recall"] = suite.recall(scorer, tok, block_size, ps, samples, template, max_value,
                                     seed, multi=multi)
        seconds["recall"] = _since(t0)
        _say(log, {"recall": out["recall"]})
    if "passkey" in evals:
        t0 = time.perf_counter()
        out["passkey"] = suite.passkey(scorer, tok, block_size, depths, samples, digits, seed)
        seconds["passkey"] = _since(t0)
        _say(log, {"passkey": out["passkey"]})
    out["seconds"] = seconds
    return out


def _default_pairs(tok, template, block_size, max_value, run_pairs, multi=False) -> list[int]:
    """The numbers of pairs of RECALL_PAIRS (and the run's own) whose rows fit the block."""
    candidates = sorted(set(RECALL_PAIRS) | ({run_pairs} if run_pairs else set()))
    fit = [n for n in candidates
           if suite.recall_pairs_fit(tok, template, block_size, n, max_value, multi) <= block_size + 1]
    if not fit:
        need = suite.recall_pairs_fit(tok, template, block_size, 1, max_value)
        raise ConfigError(f"kv recall rows with 1 pair take {need} tokens but the model's "
                          f"block_size={block_size} holds {block_size + 1}; leave recall out of "
                          "--evals.")
    return fit


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def summary_lines(result: dict) -> list[str]:
    """One line per number worth reading at a glance."""
    lines = []
    if "bpb" in result:
        b = result["bpb"]
        lines.append(f"bpb {b['bpb']:.4f} ({b['tokens']:,} tokens, {b['bytes']:,} bytes, "
                     f"{b['windows']:,} windows)")
    if "position" in result:
        lines.append("bpb by position: " + ", ".join(
            f"{c['start']}-{c['stop']} {c['bpb']:.3f}" for c in result["position"]["buckets"]
            if c["bpb"] is not None))
    if "forgetting" in result:
        lines.append("forgetting (d: copy 1 / copy 2 / control, nats per token): " + ", ".join(
            f"{r['distance']}: {r['copy1_loss']:.3f} / {r['copy2_loss']:.3f} / "
            f"{r['control_loss']:.3f}" for r in result["forgetting"]["distances"]))
    if "recall" in result:
        for r in result["recall"]["pairs"]:
            lines.append(f"recall {r['n_pairs']} pairs: exact match {r['exact_match']:.3f}, by "
                         "distance " + " ".join(f"{d['exact_match']:.2f}"
                                                for d in r["by_distance"]))
    if "passkey" in result:
        lines.append("passkey accuracy by depth: " + ", ".join(
            f"{d['depth']:g}: {d['accuracy']:.2f}" for d in result["passkey"]["depths"]))
    return lines


def _say(log, part: dict) -> None:
    if log is not None:
        for line in summary_lines(part):
            log(line)
