"""Convert an HF GPT-2 checkpoint into a params directory for any reflex config: `python
convert_weights.py --hf SRC --config configs/reflex.py --out DIR` (see --help and
reflex_jax/cli/convert.py)."""
if __name__ == "__main__":
    from reflex_jax.cli.convert import run
    run()
