"""The training contenders: this project's compiled train step (`JaxTrain`) for the `all` and
`none` schedules and the PyTorch peer (eager, torch.compile), timed interleaved with the matmul
peak of the same dtype; one row per contender."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from reflex_jax.kernels import DEFAULT, KernelChoices
from reflex_jax.run_config import base_config
from reflex_jax.train import flops
from reflex_jax.train.program import TrainProgram

from . import peak
from .settings import BenchSettings
from .timing import interleaved, rss_peak_during, steady_median


def make_program(model_fields: dict, batch: int, kernels: KernelChoices = DEFAULT,
                 documents: bool = False) -> TrainProgram:
    """The TrainProgram train.py trains with (same config path, same compiled step), for a batch
    of `batch` rows of the model `model_fields`; the bench feeds its own batch (no data), with
    packed-document inputs when `documents`."""
    c = base_config()
    for k, v in model_fields.items():
        c.model[k] = v
    c.data.loss_on, c.batch_size, c.grad_accum = "all", batch, 1
    c.data.document_mask = documents
    return TrainProgram(c, kernels=kernels)


def _memory(compiled) -> dict | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return {"temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0))}


class JaxTrain:
    """One schedule/dtype of this project's train step, compiled ahead of time (same executable),
    with the kernels `kernels` selects (the ablation switches them off one by one)."""

    def __init__(self, settings: BenchSettings, reflex: str, dtype: str, tokens_np,
                 kernels: KernelChoices = DEFAULT, documents: Optional[dict] = None):
        self.kind, self.reflex, self.dtype = "jax", reflex, dtype
        self.document_mask = documents is not None
        self.program = make_program(settings.model_fields(reflex, dtype), settings.batch, kernels,
                                    documents=documents is not None)
        self.cfg = self.program.model_config
        state = self.program.init_state()
        self.init_params = jax.device_get(state.params)
        self.batch = self.program.put_batch(
            {"tokens": tokens_np, "mask": np.ones(tokens_np.shape, np.float32), **(documents or {})})
        t0 = time.perf_counter()
        self.compiled = self.program.train_step.lower(state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.state = state
        self.memory = _memory(self.compiled)
        self.losses: list[float] = []

    def step(self) -> float:
        self.state, m = self.compiled(self.state, self.batch)
        loss = float(m["loss"])  # blocks until the step is done
        self.losses.append(loss)
        return loss


def _torch_contenders(s: BenchSettings, jax_all: JaxTrain, tokens_np, dtype: str,
                      notes: list, log) -> dict[str, Any]:
    from .torch_peer import TorchTrain
    params = jax_all.init_params
    out: dict[str, Any] = {"torch eager all": TorchTrain(jax_all.cfg, params, tokens_np, dtype,
                                                         compiled=False)}
    if s.torch_compile:
        try:
            c = TorchTrain(jax_all.cfg, params, tokens_np, dtype, compiled=True)
            out["torch.compile all"] = c
            log(f"  torch.compile all: compiled in {c.compile_s:.1f} s")
        except Exception as e:  # noqa: BLE001 - a missing compiler is a note, not a crash
            notes.append(f"torch.compile failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); its rows are skipped.")
    return out


def bench_documents(tokens_np, seed: int = 0) -> dict:
    """Segment ids and positions for the bench's batch packed from documents of 1/8 to 1/2 of a
    window each (a fixed draw): the cost of the document mask does not depend on where the
    boundaries fall, only that the kernels must apply it."""
    from reflex_jax.data import packed_documents
    B, L = tokens_np.shape
    rng = np.random.default_rng(seed)
    lengths = []
    for _ in range(B):
        row = []
        while sum(row) < L:
            row.append(int(rng.integers(max(1, L // 8), max(2, L // 2))))
        lengths.append(row)
    return packed_documents(lengths, L)


def contenders(s: BenchSettings, dtype: str, tokens_np, with_torch: bool,
               notes: list, log: Callable[[str], None],
               schedules: tuple[str, ...] = ("all", "none"),
               documents: bool = True) -> dict[str, Any]:
    """{"jax all", "jax none"[, "jax all docs"][, "torch eager all", "torch.compile all"]}:
    contenders with `.step()`; "jax all docs" is `all` with packed documents kept apart
    (data.document_mask), on the same tokens."""
    out: dict[str, Any] = {}
    for reflex in schedules:
        c = JaxTrain(s, reflex, dtype, tokens_np)
        out[f"jax {reflex}"] = c
        log(f"  jax {reflex}: compiled in {c.compile_s:.1f} s")
    if documents and "all" in schedules:
        c = JaxTrain(s, "all", dtype, tokens_np, documents=bench_documents(tokens_np))
        out["jax all docs"] = c
        log(f"  jax all, document mask: compiled in {c.compile_s:.1f} s")
    if with_torch:
        out.update(_torch_contenders(s, out["jax all"], tokens_np, dtype, notes, log))
    return out


def train_row(s: BenchSettings, c, dtype: str, times: list[float], peak_row: dict,
              growth: list[int] | None = None, steal: list[float] | None = None) -> dict:
    """Speed (the median of the reps that did not grow the heap), MFU (against the measured and,
    where known, the datasheet peak) and memory."""
    T = s.block_size
    peak_flops, datasheet = peak_row["peak_flops"], peak_row.get("datasheet_flops")
    t_step = steady_median(times, growth)
    tok_s = s.batch * T / t_step
    fpt = flops.train_flops_per_token(c.cfg, T)
    fpt_causal = 6 * flops.matmul_params(c.cfg) + flops.attention_flops_per_token(c.cfg, T) // 2
    _, rss = rss_peak_during(c.step)
    row = {"kind": c.kind, "reflex": c.reflex, "dtype": dtype,
           "document_mask": getattr(c, "document_mask", False), "step_s": t_step,
           "step_s_all": times, "heap_growth_all": growth, "steal_s_all": steal,
           "tokens_per_s": tok_s,
           "flops_per_token": fpt, "mfu": tok_s * fpt / peak_flops,
           "mfu_causal_attention": tok_s * fpt_causal / peak_flops,
           "mfu_datasheet": tok_s * fpt / datasheet if datasheet else None,
           "rss_peak_step_bytes": rss, "compile_s": c.compile_s,
           "loss_first": c.losses[0], "loss_last": c.losses[-1]}
    if c.kind == "jax":
        row["xla_memory"] = c.memory
    else:
        row["optimizer"] = c.opt_impl
    return row


def bench_dtype(s: BenchSettings, dtype: str, tokens_np, with_torch: bool,
                notes: list, log: Callable[[str], None]) -> tuple[dict, dict, dict]:
    """(rows by "<contender> <dtype>", the peak row, the loss parity) of one dtype: every
    contender and the matmul peak timed interleaved in one loop."""
    log(f"## train, {dtype}: building contenders")
    cs = contenders(s, dtype, tokens_np, with_torch, notes, log)
    fns = {name: c.step for name, c in cs.items()}
    mm = peak.matmul_contenders(s.peak_n, dtype, with_torch)
    fns.update({f"matmul {k}": f for k, f in mm.items()})
    log(f"## train, {dtype}: {s.train_reps} interleaved reps")
    growth: dict = {}
    steal: dict = {}
    times = interleaved(fns, s.train_reps, log, warmup_rounds=2, growth=growth, steal=steal)
    peak_row = peak.peak_row(s.peak_n, dtype, {k: times[f"matmul {k}"] for k in mm})
    rows = {f"{name} {dtype}": train_row(s, c, dtype, times[name], peak_row, growth[name], steal[name])
            for name, c in cs.items()}
    # same weights and batch: the first losses must agree (architecture parity)
    first = {n: c.losses[0] for n, c in cs.items()
             if c.reflex == "all" and not getattr(c, "document_mask", False)}
    parity = {"first_losses": first, "max_abs_diff": max(first.values()) - min(first.values())}
    return rows, peak_row, parity
