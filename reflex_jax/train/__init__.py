"""Training: the pure step functions (step.py), the loop (trainer.py), pre-compile checks,
metrics, the optimizer, FLOP counts, `init_from` restore and the dry-run report."""
