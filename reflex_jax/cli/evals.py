"""Evaluate a run or params directory: bits per byte of a text set (whole and by position in the
window), a forgetting curve, key-value recall on every answer, passkey retrieval by depth.

    reflex-evals --run runs/x --text ../shared/data/ru_text/turgenev --json evals.json
    python -m reflex_jax.evals --run runs/x --evals recall,passkey --pairs 2,4,8

Prints a few summary lines; --json writes every number (docs/study.md#evaluations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from ..errors import UsageError
from . import quiet_start, user_errors_as_status

PROG = "reflex-evals"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (train.py) or params directory")
    p.add_argument("--evals", default=None,
                   help="comma-separated, of bpb,position,forgetting,recall,passkey (default: all "
                        "five with --text, recall,passkey without)")
    p.add_argument("--text", nargs="+", default=[],
                   help="held-out text: directories of .txt files (searched recursively) or .txt "
                        "files, one document each (bpb, position, forgetting)")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: best)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="without --step: best (lowest val loss) or latest checkpoint")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer named in meta.json")
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows per forward pass (default: up to 32, fewer for large vocab x block)")
    p.add_argument("--samples", type=int, default=32,
                   help="passages per distance, contexts per number of pairs, keys per depth "
                        "(default 32)")
    p.add_argument("--seed", type=int, default=0, help="draws passages, contexts and keys")
    p.add_argument("--max_windows", type=int, default=None,
                   help="bpb/position: score only the first this many windows (default: all)")
    p.add_argument("--buckets", type=int, default=8,
                   help="position: equal position buckets over the window (default 8)")
    p.add_argument("--passage", type=int, default=None,
                   help="forgetting: passage tokens (default block_size // 8)")
    p.add_argument("--distances", default=None,
                   help="forgetting: comma-separated distances in tokens (default 0, powers of "
                        "two from 8, and the longest that fits)")
    p.add_argument("--pairs", default=None,
                   help="recall: comma-separated numbers of pairs (default: those of 1,2,4,...,32 "
                        "and the run's own n_pairs whose rows fit the block)")
    p.add_argument("--max_value", type=int, default=None,
                   help="recall: values 0..max_value (default: the run's kv_recall option, else 9)")
    p.add_argument("--recall_format", choices=("auto", "single", "multi"), default="auto",
                   help="recall: one pair asked a row (single), or every pair of a context asked in "
                        "turn in one row (multi, kv_recall's queries format); auto: multi when the "
                        "run trained with queries > 1")
    p.add_argument("--template", default=None,
                   help="recall: the row template (default: the run's, as meta.json names it)")
    p.add_argument("--depths", default=None,
                   help="passkey: comma-separated depths, fractions 0..1 (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--passkey_digits", type=int, default=5, help="passkey: digits of the key")
    return p.parse_args(argv)


def _numbers(flag: str, text: Optional[str], kind):
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{flag} {text!r} must be comma-separated numbers, e.g. "
                         f"--{flag} {'0,0.5,1' if kind is float else '1,2,4'}.") from None
    if not values:
        raise UsageError(f"--{flag} {text!r} names no number; e.g. --{flag} "
                         f"{'0,0.5,1' if kind is float else '1,2,4'}.")
    return values


def evaluate(args) -> dict:
    from ..evals import DEFAULT_DEPTHS, evaluate as run_evals, parse_evals
    evals = parse_evals(args.evals, bool(args.text))
    options = {"samples": args.samples, "seed": args.seed, "buckets": args.buckets,
               "max_windows": args.max_windows, "passage": args.passage,
               "distances": _numbers("distances", args.distances, int),
               "pairs": _numbers("pairs", args.pairs, int),
               "depths": _numbers("depths", args.depths, float) or DEFAULT_DEPTHS,
               "digits": args.passkey_digits, "recall_format": args.recall_format}
    if args.max_value is not None:
        options["max_value"] = args.max_value
    if args.template is not None:
        options["template"] = args.template.replace("\\n", "\n")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"--json {args.json!r} is in a directory that does not exist; create it "
                         "or pass another path.")
    return run_evals(args.run, evals, text=args.text, tokenizer=args.tokenizer, step=args.step,
                     which=args.which, batch_size=args.batch_size,
                     log=lambda line: print(line, flush=True), **options)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    result = {}
    status = user_errors_as_status(PROG, lambda: result.update(evaluate(args)))
    if status:
        return status
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def run():
    """Console-script entry (reflex-evals)."""
    quiet_start()
    sys.exit(main())


if __name__ == "__main__":
    run()
