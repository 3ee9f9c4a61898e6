"""Convert weights in and out: HF GPT-2 / Llama / Mistral / Qwen2 or the original PyTorch Reflex code
in, HF or original out.

    python convert_weights.py --hf ai-forever/rugpt3large_based_on_gpt2 --config configs/reflex.py \\
        --out weights/rugpt3large_reflex [--layers 0,4,8,12,16,20] [--config.model.n_layer=6]
    python convert_weights.py --hf Qwen/Qwen2-0.5B --out weights/qwen2   # the source's own model
    python convert_weights.py --original ckpt_2000.pt --out weights/original
    python convert_weights.py --export hf --run runs/reflex --out export/reflex_hf
    python convert_weights.py --export original --run runs/reflex --out export/reflex_original

The mappings are documented in docs/convert.md (imports, and the original format out) and
docs/export.md (the HF export); an import prints what it copied, folded, sliced, set, freshly
initialised and dropped. An imported directory loads with `reflex_jax.checkpoint.load_params(out)`
and is what `init_from` in a training config points at.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import UsageError
from . import quiet_start, user_errors_as_status

PROG = "convert_weights.py"
EXPORTS = ("hf", "original")


def parse_args(argv: Optional[Sequence[str]]):
    """(flags, config overrides): every `--config.<field>` word is an override."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="import an HF checkpoint (model_type gpt2, llama, mistral or "
                     "qwen2): a local directory or a hub id")
    src.add_argument("--original", help="import the original PyTorch Reflex code's model: a "
                     "PyTorchModelHubMixin directory, a hub id of one, or a notebook ckpt_*.pt")
    src.add_argument("--export", choices=EXPORTS, help="export --run as an HF trust_remote_code "
                     "directory (hf) or in the original code's format (original)")
    p.add_argument("--config", help="with --hf: config file whose .model section is the target "
                   "architecture (default: the source's own, exactly; --config.model.* overrides "
                   "apply to either)")
    p.add_argument("--run", help="with --export: a train.py run directory or a params directory")
    p.add_argument("--step", type=int, default=None, help="with --export from a run: this step "
                   "(default: the best checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", default=None, help="with --hf: comma-separated source layers, one "
                   "per target layer (default: target layer i <- source layer i)")
    p.add_argument("--seed", type=int, default=None, help="with --hf: seed for freshly "
                   "initialised params (default: config.seed)")
    return p.parse_known_args(argv)


def _check_flags(args, overrides: Sequence[str]) -> None:
    if args.export and not args.run:
        raise UsageError("--export needs --run, the run or params directory to export.")
    if not args.hf:
        for flag in ("config", "layers", "seed"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} applies to --hf imports only; drop it.")
    if not args.export and (args.run or args.step is not None):
        raise UsageError("--run and --step apply to --export only; drop them.")
    if args.export and overrides:
        raise UsageError(f"{overrides[0]!r}: an export writes the model as trained; drop the "
                         "--config.* overrides.")


def _done(out: str) -> None:
    print(f"\nwrote {out} (load with reflex_jax.checkpoint.load_params, or set "
          f"--config.init_from={out} when training)")


def import_hf(args, overrides: Sequence[str]) -> None:
    """Onto --config's model, or without it onto the source's own (exact) model + overrides."""
    from ..interop.hf_gpt2 import parse_layers
    from ..interop.hf_import import convert_to_dir
    from ..run_config import load_config, model_config_from, model_overrides, split_overrides
    layers = parse_layers(args.layers)
    if args.config:
        config = load_config(args.config, split_overrides(overrides))
        cfg, model, seed = model_config_from(config), None, int(config.get("seed", 0))
    else:
        cfg, model, seed = None, model_overrides(overrides), 0
    seed = args.seed if args.seed is not None else seed
    report = convert_to_dir(args.hf, cfg, args.out, layers, seed, model)
    print(report.table())
    _done(args.out)


def import_original(args, overrides: Sequence[str]) -> None:
    from ..run_config import model_overrides
    model = model_overrides(overrides)
    from ..interop.original import convert_original_to_dir
    report = convert_original_to_dir(args.original, args.out, model)
    print(report.table())
    _done(args.out)


def export(args) -> None:
    from ..interop.export import export_run
    print(export_run(args.export, args.run, args.out, step=args.step))


def convert(args, overrides: Sequence[str]) -> None:
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    _check_flags(args, overrides)
    if args.hf:
        import_hf(args, overrides)
    elif args.original:
        import_original(args, overrides)
    else:
        export(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = parse_args(argv)
    return user_errors_as_status(PROG, lambda: convert(args, rest))


def run():
    """Console-script entry (reflex-convert)."""
    quiet_start()
    sys.exit(main())
