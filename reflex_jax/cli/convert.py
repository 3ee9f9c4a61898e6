"""Convert an HF GPT-2 checkpoint into a params directory for any reflex config.

    python convert_weights.py --hf ai-forever/rugpt3large_based_on_gpt2 --config configs/reflex.py \\
        --out weights/rugpt3large_reflex [--layers 0,4,8,12,16,20] [--config.model.n_layer=6]

The mapping is documented in docs/convert.md; the tool prints what it copied, sliced, set, freshly
initialised and dropped. The output loads with `reflex_jax.checkpoint.load_params(out)` and is what
`init_from` in a training config points at.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import user_errors_as_status

PROG = "convert_weights.py"


def parse_args(argv: Optional[Sequence[str]]):
    """(flags, config overrides): every `--config.<field>` word is an override."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file; its .model section is the "
                   "target architecture")
    p.add_argument("--hf", required=True, help="HF GPT-2 checkpoint: a local directory or a hub id")
    p.add_argument("--out", required=True, help="output params directory")
    p.add_argument("--layers", default=None, help="comma-separated source layers, one per target "
                   "layer (default: target layer i <- source layer i)")
    p.add_argument("--seed", type=int, default=None, help="seed for freshly initialised params "
                   "(default: config.seed)")
    return p.parse_known_args(argv)


def convert(args, overrides: Sequence[str]) -> None:
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    from ..interop.hf_gpt2 import convert_to_dir, parse_layers
    from ..run_config import load_config, model_config_from, split_overrides
    config = load_config(args.config, split_overrides(overrides))
    seed = args.seed if args.seed is not None else int(config.get("seed", 0))
    report = convert_to_dir(args.hf, model_config_from(config), args.out,
                            parse_layers(args.layers), seed)
    print(report.table())
    print(f"\nwrote {args.out} (load with reflex_jax.checkpoint.load_params, or set "
          f"--config.init_from={args.out} when training)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = parse_args(argv)
    return user_errors_as_status(PROG, lambda: convert(args, rest))


def run():
    """Console-script entry (reflex-convert)."""
    sys.exit(main())
