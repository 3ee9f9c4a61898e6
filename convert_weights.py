"""Convert an HF GPT-2 checkpoint into a params directory for any reflex config.

    python convert_weights.py --hf ai-forever/rugpt3large_based_on_gpt2 --config configs/reflex.py \\
        --out weights/rugpt3large_reflex [--layers 0,4,8,12,16,20] [--config.model.n_layer=6]

The mapping is documented in notes/convert.md; the tool prints what it copied, sliced, set, freshly
initialised and dropped. The output loads with `reflex_jax.checkpoint.load_params(out)` and is what
`init_from` in a training config points at.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from reflex_jax.checkpoint import CheckpointError
from reflex_jax.config import ConfigError
from reflex_jax.convert import ConvertError, convert_to_dir, parse_layers
from reflex_jax.defaults import model_config_from

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (its .model "
                                          "section is the target architecture).")
_HF = flags.DEFINE_string("hf", None, "HF GPT-2 checkpoint: a local directory or a hub id.")
_OUT = flags.DEFINE_string("out", None, "output params directory.")
_LAYERS = flags.DEFINE_string("layers", None, "comma-separated source layers, one per target layer "
                              "(default: target layer i <- source layer i).")
_SEED = flags.DEFINE_integer("seed", None, "seed for freshly initialised params (default: config.seed).")
flags.mark_flags_as_required(["config", "hf", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    config = _CONFIG.value
    seed = _SEED.value if _SEED.value is not None else int(config.get("seed", 0))
    try:
        cfg = model_config_from(config)
        report = convert_to_dir(_HF.value, cfg, _OUT.value, parse_layers(_LAYERS.value), seed)
    except (ConvertError, ConfigError, CheckpointError) as e:
        sys.exit(f"convert_weights: {e}")
    print(report.table())
    print(f"\nwrote {_OUT.value} (load with reflex_jax.checkpoint.load_params, or set "
          f"--config.init_from={_OUT.value} when training)")


if __name__ == "__main__":
    app.run(main)
