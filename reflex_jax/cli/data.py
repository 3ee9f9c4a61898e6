"""The data CLI: prepare a directory from a source, generate a built-in task, or describe a directory.

    python -m reflex_jax.data prepare --source <hub id | files | dir>
        --tokenizer <hub id | dir | bytes> --out DIR
    python -m reflex_jax.data task --task mix --out DIR --option n_pairs=3
    python -m reflex_jax.data info DIR --block_size 512
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..data import (DEFAULT_SOURCE, DEFAULT_TEMPLATE, DEFAULT_TOKENIZER, LONG_ROWS, TokenData, prepare,
                    prepare_task, reach_summary, window_reach)
from ..errors import UsageError
from ..text import decode_user_text
from . import quiet_start, user_errors_as_status

PROG = "reflex_jax.data"


def _unescape(text: str) -> str:
    """Shell-friendly templates: a typed backslash-n is a newline."""
    return decode_user_text(text, "--template").replace("\\n", "\n").replace("\\t", "\t")


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _task_options(items: Sequence[str]) -> dict:
    options = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--option {item!r} must look like KEY=VALUE, e.g. n_pairs=8.")
        k, v = item.split("=", 1)
        options[k.strip()] = _option_value(v)
    return options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reflex_jax.data",
                                description="Data: prepare text (HF hub, local files, built-in tasks) "
                                            "into token files, and load batches from them.")
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
    pp.add_argument("--val_source", nargs="+", default=None,
                    help="files that form the whole val split instead of a random draw (e.g. one "
                         "held-out author's .txt directory); --val_fraction and --seed are then unused")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--long_rows", choices=LONG_ROWS, default="keep",
                    help="rows longer than --max_tokens: keep (training windows also start inside "
                         "them, so every token is trained), split into pieces, or drop")
    pp.add_argument("--max_tokens", type=int, default=None, help="row length limit for --long_rows")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace --out when it holds data prepared from another source or options")
    pp.add_argument("--hf_split", default="train", help="split of a hub dataset to read")
    pp.add_argument("--batch_rows", type=int, default=1024, help="rows per tokenizer call")
    pp.add_argument("--no_progress", action="store_true")
    pt = sub.add_parser("task", help="generate a built-in task (reflex_jax.data.tasks) into a directory")
    pt.add_argument("--task", required=True)
    pt.add_argument("--out", required=True)
    pt.add_argument("--tokenizer", default="bytes")
    pt.add_argument("--n_train", type=int, default=20000)
    pt.add_argument("--n_val", type=int, default=256)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--template", default=DEFAULT_TEMPLATE)
    pt.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. --option n_pairs=8 (repeatable)")
    pt.add_argument("--overwrite", action="store_true",
                    help="replace --out when it holds data prepare made from a source")
    pi = sub.add_parser("info", help="print a prepared directory's summary and meta.json")
    pi.add_argument("dir")
    pi.add_argument("--block_size", type=int, default=None,
                    help="also say, per split, how many rows are longer than a window of this block "
                         "size and how many answer tokens training windows cannot reach")
    return p


def _command(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        prepare(args.source, args.tokenizer, args.out, template=_unescape(args.template),
                fields=args.fields.split(",") if args.fields else None,
                val_fraction=args.val_fraction, seed=args.seed, long_rows=args.long_rows,
                max_tokens=args.max_tokens, hf_split=args.hf_split, batch_rows=args.batch_rows,
                overwrite=args.overwrite, progress=not args.no_progress, val_source=args.val_source)
    elif args.command == "task":
        prepare_task(args.task, args.out, tokenizer=args.tokenizer, n_train=args.n_train,
                     n_val=args.n_val, seed=args.seed, template=_unescape(args.template),
                     overwrite=args.overwrite, **_task_options(args.option))
    else:
        _info(args.dir, args.block_size)


def _info(directory: str, block_size: Optional[int]) -> None:
    if block_size is not None and block_size < 1:
        raise UsageError(f"--block_size={block_size} must be >= 1.")
    data = TokenData.open(directory)
    print(data.meta.get("summary", ""))
    if block_size is not None:
        for split in data.splits:
            print(reach_summary(window_reach(data, split, block_size), data.meta))
    print(json.dumps(data.meta, ensure_ascii=False, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The exit status: 0, or 2 after printing `reflex_jax.data: error: <sentence>` for a user's
    mistake (argparse exits with 2 itself on a bad command line)."""
    args = _parser().parse_args(argv)
    return user_errors_as_status(PROG, lambda: _command(args))


def run() -> None:
    quiet_start()
    sys.exit(main())
