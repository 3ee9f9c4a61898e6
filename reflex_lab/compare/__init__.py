"""Compare reflex schedules (and other config variants) over seeds at equal data, steps, tokens and
optimizer, and report what the numbers say.

    python compare.py --config configs/tiny.py --schedules none,all,recent:2,1 --seeds 0,1,2 \
        --config.max_steps=300 --out experiments/tiny_arith

Every run of the grid is `<runs_dir>/<run name>` (default `runs/compare/<basename of out>/`; run names
are `<schedule>-s<seed>`, or `<variant>-<schedule>-s<seed>` with `--variant`). Runs train in this
process, one after the other, with the trainer of `train.py`. All runs share the config file and its
overrides; only `model.head_plan`, `seed`, `run_dir` and the variant's overrides differ, so every run of a
seed sees the same batches (the batch at step s is a pure function of (seed, s), and built-in task
data is generated from the seed).

Resumable: a run whose metrics reached `max_steps` (with its final checkpoint, if it wrote
checkpoints) is not trained again; a run that stopped half-way resumes from its latest checkpoint; a
run directory trained with a different config is an error, never silently mixed in; a finished run
whose directory is gone counts as finished when `<out>/results.json` records it with the same config
fingerprint (the report keeps each run's eval curve for that).

`<out>/results.md`, `<out>/results.json` and PNG plots hold the results: mean ± sample std over
seeds of the final and best validation loss, the final exact match (built-in tasks; by recall
distance for kv_recall), bits per byte and answer-only loss where the runs logged them, tokens/s,
parameters and KV-cache bytes per token; runs that did not finish are listed as such and left out
of the means. docs/experiments.md describes the tool and the experiments run with it.

Modules: grid (parse the command line's schedules, seeds and variants; plan the runs), runs (what is
on disk, training the grid), stats (per-run summaries, means over seeds), report (results.md and
results.json), plots (the PNG curves), cli (the command line).
"""
