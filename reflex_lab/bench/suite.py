"""The whole benchmark in one process: training (every dtype), generation, KV cache, ratios."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from ..machine import cpu_count, environment
from .generation import run_generation
from .report import kv_cache_report, ratios
from .settings import BenchSettings
from .train import bench_dtype


def _setup_torch(s: BenchSettings, res: dict) -> bool:
    """Whether the PyTorch contenders run (torch wanted and installed); torch gets every core."""
    if not s.torch:
        return False
    try:
        import torch
    except ImportError:
        res["notes"].append("torch is not installed: the PyTorch rows are skipped.")
        return False
    torch.set_num_threads(cpu_count())
    res["env"]["torch_threads"] = torch.get_num_threads()
    return True


def run(s: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Every measurement `s` asks for; the result is what bench.py prints and writes as JSON."""
    res: dict = {"settings": dataclasses.asdict(s), "env": environment(), "notes": []}
    have_torch = _setup_torch(s, res)
    log(f"# bench {s.name}: {res['env']['cpu']}, {res['env']['cores']} cores, load "
        f"{res['env']['load_avg_start']:.2f}")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, s.vocab_size, (s.batch, s.block_size + 1)).astype(np.int32)
    res["train"], res["peak"], res["train_parity"] = {}, {}, {}
    for dtype in (s.dtypes if s.train else ()):
        rows, res["peak"][dtype], res["train_parity"][dtype] = bench_dtype(
            s, dtype, tokens, have_torch, res["notes"], log)
        res["train"].update(rows)
    if s.gen:
        res["generation"] = run_generation(s, log, have_torch and s.hf)
    res["kv_cache"] = kv_cache_report(s)
    res["ratios"] = ratios(res, s)
    res["env"]["load_avg_end"] = os.getloadavg()[0]
    return res
