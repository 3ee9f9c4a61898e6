"""reflex_lab: benchmark and experiment tooling around the reflex_jax library.

`reflex_lab.bench` measures this project's train step and generation against PyTorch and HF
transformers (`python bench.py`, `reflex-bench`); `reflex_lab.compare` trains and reports grids of
schedules x seeds (`python compare.py`, `reflex-compare`); `reflex_lab.schedule_plot` draws a
schedule; `reflex_lab.machine` describes the machine a measurement ran on. Nothing in reflex_jax
imports from here.
"""
