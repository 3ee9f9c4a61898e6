"""What each optimised kernel of the train step buys: the `all` schedule's step with the kernels
of `reflex_jax.kernels.KernelChoices` switched on one by one, every variant compiled in one process
and timed interleaved (same machine noise), for every dtype."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from reflex_jax.kernels import SWITCHES, KernelChoices

from ..machine import environment
from .report import mib
from .settings import BenchSettings
from .stats import paired_ratio
from .timing import interleaved, steady_median, steady_pairs
from .train import JaxTrain

# each step switches one more optimised kernel on, in this order; the last is this project
_SWITCHED_ON = (("+ fused chunked loss", "fused_loss"),
                ("+ Dense fwd/bwd (f32-accumulating dots, f32 bias sums)", "f32_linear"),
                ("+ causal attention in query blocks (autodiff)", "attention_blocks"),
                ("+ blockwise attention, written-out backward (= this project)",
                 "blockwise_backward"))


def _ablation_steps() -> tuple[tuple[str, KernelChoices], ...]:
    assert {switch for _, switch in _SWITCHED_ON} == set(SWITCHES)
    kernels = KernelChoices(**{switch: False for switch in SWITCHES})
    steps = [("plain jit port", kernels)]
    for label, switch in _SWITCHED_ON:
        kernels = dataclasses.replace(kernels, **{switch: True})
        steps.append((label, kernels))
    return tuple(steps)


ABLATION_STEPS = _ablation_steps()  # (label, KernelChoices)


def _variants(s: BenchSettings, dtype: str, tokens_np, log) -> dict[str, JaxTrain]:
    variants = {}
    for label, kernels in ABLATION_STEPS:
        c = JaxTrain(s, "all", dtype, tokens_np, kernels)
        variants[label] = c
        log(f"  {dtype} {label}: compiled in {c.compile_s:.1f} s; XLA temp "
            f"{mib((c.memory or {}).get('temp_bytes'))}")
    return variants


def _speedup(times: dict, growth: dict, earlier: str, label: str) -> dict:
    """The earlier variant's time over this one's, paired by round, rounds of heap growth dropped."""
    return paired_ratio(times[earlier], times[label], steady_pairs(growth[earlier], growth[label]))


def ablation(s: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """One row per (dtype, ABLATION_STEPS label): median step time, speed-up over the previous
    step and over the plain port (paired ratios with 95% intervals, stats.py), XLA temp memory,
    first loss."""
    tokens = np.random.default_rng(0).integers(0, s.vocab_size, (s.batch, s.block_size + 1)).astype(np.int32)
    out: dict = {"settings": dataclasses.asdict(s), "env": environment(), "rows": []}
    for dtype in s.dtypes:
        variants = _variants(s, dtype, tokens, log)
        growth: dict = {}
        times = interleaved({k: c.step for k, c in variants.items()}, s.train_reps, log,
                            warmup_rounds=2, growth=growth)
        labels = list(variants)
        for i, (label, c) in enumerate(variants.items()):
            # speed-ups: the earlier variant's time over this one's
            out["rows"].append({"dtype": dtype, "variant": label,
                                "step_s": steady_median(times[label], growth[label]),
                                "step_s_all": times[label], "heap_growth_all": growth[label],
                                "vs_previous": _speedup(times, growth, labels[i - 1], label)
                                if i else None,
                                "vs_plain": _speedup(times, growth, labels[0], label),
                                "xla_temp_bytes": (c.memory or {}).get("temp_bytes"),
                                "loss_first": c.losses[0]})
    out["env"]["load_avg_end"] = os.getloadavg()[0]
    return out
