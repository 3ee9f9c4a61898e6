"""The first run on a GPU: what the CPU machines cannot measure, in one process, under 8 minutes.

    python scripts/gpu_check.py --json gpu_check.json                # one H100 or H200
    python scripts/gpu_check.py --smoke --json /tmp/gpu_check.json   # the same code paths, tiny, CPU

Sections (`--sections`, comma-separated; default all), each timed, each in its own try/except so
that one failure is recorded in the JSON and the others still run:

* parity: a small model's logits on the accelerator against the same params on the CPU backend,
  float32 (matmuls at "highest" precision; the default precision's difference is recorded too)
  and bfloat16, against the tolerance of tests/tolerance.py.
* cudnn: the reference run's head size (n_embd 1536 / 8 heads = 192) through `attention=cudnn`,
  `auto` and `xla`, plain causal and with packed documents: which kernel the compiled HLO holds
  (`__cudnn$fmha...` custom calls), any refusal sentence, time and values against XLA.
* train: the reference run's train step (configs/reflex.py: the TrainProgram train.py trains
  with, random weights, a random packed batch) for `all` and `none`: compile time, median step
  time after warm-up, tokens/s, loss, which attention kernel it compiled to.
* mfu: the train step's MFU against the chip's datasheet dense bf16 peak, FLOPs from
  reflex_jax/train/flops.py; no MFU for a chip without a datasheet figure.
* memory: the train step's compiled memory on the device and the allocator's peak during its
  steps, against what the dry run (reflex_jax/train/dry_run.py) predicts for the same config
  compiled deviceless for that GPU (in a subprocess with JAX_PLATFORMS=cpu).
* decode: cached greedy generation tokens/s of the reference architecture (`all`) and of its
  vanilla GPT-2 twin against HF `generate` on the same weights on the same device (skipped,
  with the reason, where torch has no CUDA).

The JSON is rewritten after every section. Exit status 0 when every section ran or was skipped
with a reason, 1 when one failed a check or raised, 2 for a command-line mistake.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import platform as platform_mod
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the checkout beside this script, installed or not
    sys.path.insert(0, ROOT)

from reflex_jax.errors import UsageError  # noqa: E402  (after the path; imports no third party)

PROG = "gpu_check.py"
SECTIONS = ("parity", "cudnn", "train", "mfu", "memory", "decode")
NEEDS_TRAIN = ("mfu", "memory")  # read the train section's measurements
# modules beyond the GPU image's jax / flax / optax / orbax / transformers / torch that a section
# imports, with what needs them
NEEDS_MODULES = {"train": ("ml_collections",), "mfu": ("ml_collections",),
                 "memory": ("ml_collections",)}
DEFAULT_BUDGET_S = 360.0
# Dense bf16 datasheet peaks of GPUs that reflex_jax.hardware.CHIPS (the compile targets) does not
# list; CHIPS comes first. nvidia.com/en-us/data-center/h100: H100 PCIe BF16 1,513 TFLOPS with
# sparsity, dense is half.
EXTRA_PEAKS = {"nvidia h100 pcie": (1513e12 / 2, "nvidia.com/en-us/data-center/h100: H100 PCIe BF16 "
                                    "Tensor Core 1,513 TFLOPS with sparsity (756.5 dense)")}
GOAL_MFU = 0.50  # the reference run's MFU goal on an H100 (docs/bench.md, "GPU check")
TOLERANCE_FACTOR = 32  # tests/tolerance.py: FACTOR * eps(dtype) * sqrt(depth) * max|reference|


# ---- sizes: the real check and the smoke run -----------------------------------------------------

FULL = dict(
    parity_model=dict(vocab_size=1024, block_size=256, n_layer=3, n_head=4, n_embd=256),
    parity_batch=2,
    cudnn_model=dict(vocab_size=1024, block_size=2048, n_layer=2, n_head=8, n_embd=1536),
    cudnn_batch=1, cudnn_reps=5,
    train_model={}, train_batch=None,  # configs/reflex.py as it is: batch 16 x grad_accum 2
    warmup_steps=3, timed_steps=10,
    decode_model=dict(vocab_size=50257, n_layer=6, n_head=8, n_embd=1536),
    decode_prompt=512, decode_new=128, decode_batches=(1, 8), decode_reps=3,
    predict_timeout_s=360)
SMOKE = dict(
    parity_model=dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32),
    parity_batch=2,
    cudnn_model=dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64),
    cudnn_batch=1, cudnn_reps=1,
    train_model=dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32),
    train_batch=(4, 2), warmup_steps=1, timed_steps=2,
    decode_model=dict(vocab_size=256, n_layer=2, n_head=2, n_embd=32),
    decode_prompt=8, decode_new=4, decode_batches=(2,), decode_reps=1,
    predict_timeout_s=120)
# the reference architecture's building blocks (configs/reflex.py), for the models built here
REFERENCE_BLOCKS = dict(norm="rmsnorm", mlp="swiglu", bias=True, pos_emb="learned", norm_eps=1e-6,
                        tie_embeddings=True, dropout=0.0, head_plan="all")


# ---- the command line ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence instead of usage + message
        raise UsageError(f"{message.rstrip('.')}; see {PROG} --help.")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the results here (rewritten after every "
                   "section)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes: the same code paths on any machine in seconds (the tests)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all); mfu and "
                   "memory run train too")
    p.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                   help="start no section after this many seconds (default %(default)s); a "
                   "section not started is recorded as skipped")
    p.add_argument("--predict_memory", help=argparse.SUPPRESS)  # the dry-run subprocess
    args = p.parse_args(argv)
    if args.predict_memory:
        return args
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        what = f"the unknown section {unknown[0]!r}" if unknown else "no section"
        raise UsageError(f"--sections={args.sections!r} names {what}; use a comma-separated "
                         f"subset of {', '.join(SECTIONS)}.")
    if any(s in NEEDS_TRAIN for s in names) and "train" not in names:
        names.append("train")
    args.sections = [s for s in SECTIONS if s in names]
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json {args.json!r}: the folder {folder!r} does not exist; create "
                             "it or name a path in an existing folder.")
    if not args.budget_s > 0:
        raise UsageError(f"--budget_s={args.budget_s} must be a positive number of seconds.")
    return args


# ---- small helpers -------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].strip() if text else ''}".rstrip(": ")


def _missing_modules(names) -> list[str]:
    import importlib.util

    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a parent package missing; a module blocked with None
            return True
    return [m for m in names if missing(m)]


def _missing_sentence(section: str, missing: list[str]) -> str:
    return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed here, and "
            f"the {section} section needs it (reflex_jax's run config, the train step's program, "
            f"is an ml_collections ConfigDict); install it with: pip install ml-collections "
            "(a pure-Python wheel: on a machine without network, pip download it elsewhere and "
            "pip install --no-deps the file)")


def _tolerance(ref, depth: int, dtype: str) -> float:
    import jax.numpy as jnp
    import numpy as np
    eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
    return TOLERANCE_FACTOR * eps * math.sqrt(depth) * float(np.max(np.abs(ref)))


def _cudnn_calls(hlo: str) -> dict:
    """Counts of the cuDNN custom-call targets in compiled HLO text."""
    return dict(collections.Counter(re.findall(r"__cudnn\$[A-Za-z]+", hlo)))


def _backend_in(hlo: str) -> str:
    calls = _cudnn_calls(hlo)
    if any(k.startswith("__cudnn$fmha") for k in calls):
        return "cudnn"
    if "tpu_custom_call" in hlo:
        return "pallas"
    return "xla"


class _Captured(logging.Handler):
    """The attention dispatch's warnings (auto's reason for falling back to XLA) while compiling."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _capturing_attention_warnings(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    from reflex_jax.kernels import attention
    logger = logging.getLogger(attention.__name__)
    handler = _Captured()
    attention._warn_once.cache_clear()  # it logs each reason once per process
    logger.addHandler(handler)
    try:
        return fn(), handler.messages
    finally:
        logger.removeHandler(handler)


def _median(xs) -> float:
    import statistics
    return float(statistics.median(xs))


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _gib(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


# ---- the environment -----------------------------------------------------------------------------

def versions() -> dict:
    from importlib import metadata
    out = {"python": platform_mod.python_version()}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy",
                 "transformers", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    plugins = {}
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if re.fullmatch(r"jax-cuda\d+-(plugin|pjrt)", name):
            plugins[name] = d.version
    out["cuda_plugin"] = plugins or None
    try:  # the CUDA plugin's own report of the libraries it loaded
        from jax._src.lib import cuda_versions
        if cuda_versions is not None:
            out["cudnn"] = cuda_versions.cudnn_get_version()
            out["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
    except Exception:  # noqa: BLE001 - not a CUDA jaxlib, or another private layout
        pass
    return out


def device_info() -> dict:
    import jax
    devices = jax.devices()
    d = devices[0]
    info = {"platform": d.platform, "device_kind": d.device_kind, "count": len(devices),
            "default_backend": jax.default_backend()}
    for attr in ("compute_capability", "core_count"):
        value = getattr(d, attr, None)
        if value is not None:
            info[attr] = value
    try:
        info["platform_version"] = d.client.platform_version
    except Exception:  # noqa: BLE001
        pass
    return info


def datasheet_peak(device) -> tuple[Optional[float], str]:
    """(dense bf16 FLOP/s per chip, where it comes from), or (None, why there is none)."""
    from reflex_jax.hardware import device_kind_chip
    if device.platform == "cpu":
        return None, (f"no datasheet bf16 peak for a CPU ({device.device_kind!r}): MFU is quoted "
                      "against a GPU's datasheet here (bench.py measures a CPU's matmul peak)")
    chip = device_kind_chip(device)
    if chip is not None:
        return chip.peak_bf16_flops, chip.source
    extra = EXTRA_PEAKS.get(device.device_kind.strip().lower())
    if extra is not None:
        return extra
    return None, (f"no datasheet bf16 peak is known for device kind {device.device_kind!r}, so "
                  "no MFU is reported; add the chip to reflex_jax/hardware.py's CHIPS")


# ---- the run -------------------------------------------------------------------------------------

class Check:
    """One run: the sections, their shared measurements, the JSON written after each."""

    def __init__(self, args):
        self.args, self.sizes = args, (SMOKE if args.smoke else FULL)
        self.t0 = time.perf_counter()
        self.result: dict = {"script": "scripts/gpu_check.py", "smoke": bool(args.smoke),
                             "argv": sys.argv[1:],
                             "date_utc": datetime.datetime.now(datetime.timezone.utc)
                             .isoformat(timespec="seconds"),
                             "sections": {}}
        self.train_rows: dict = {}    # schedule -> row (the train section's measurements)
        self.train_memory: dict = {}  # the `all` step's compiled memory and allocator stats
        self.train_accum: Optional[int] = None
        self.train_attention: Optional[str] = None  # "xla" after the reference's kernels failed
        self._predictor = None        # the dry-run subprocess

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self):
        self.result["wall_s"] = round(self.elapsed(), 2)
        if not self.args.json:
            return
        tmp = f"{self.args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(tmp, self.args.json)

    def log(self, text: str):
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def run_section(self, name: str, fn: Callable[[], dict]):
        t = time.perf_counter()
        out: dict
        missing = _missing_modules(NEEDS_MODULES.get(name, ()))
        if self.elapsed() > self.args.budget_s:
            out = {"status": "skipped", "reason": f"the time budget of {self.args.budget_s:.0f} s "
                   f"was spent before this section started (--budget_s)"}
        elif missing:
            out = {"status": "skipped", "reason": _missing_sentence(name, missing)}
        elif name in NEEDS_TRAIN and not self.train_rows:
            why = self.result["sections"].get("train", {})
            out = {"status": "skipped", "reason": "the train section measured nothing ("
                   + (why.get("error") or why.get("reason") or "not run") + ")"}
        else:
            self.log(f"{name} ...")
            try:
                out = fn()
                out.setdefault("status", "ok")
            except Exception as e:  # noqa: BLE001 - a GPU check records and goes on
                out = {"status": "error", "error": _first_line(e),
                       "traceback": traceback.format_exc()[-6000:]}
        out["wall_s"] = round(time.perf_counter() - t, 2)
        self.result["sections"][name] = out
        self.log(f"{name}: {out['status']} in {out['wall_s']:.1f} s"
                 + (f" ({out.get('reason') or out.get('error')})"
                    if out["status"] in ("skipped", "error") else ""))
        self.write()

    def main(self) -> int:
        import jax
        self.result["versions"] = versions()
        self.result["device"] = device_info()
        self.result["env"] = {k: os.environ.get(k) for k in (
            "JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR", "CUDA_VISIBLE_DEVICES")}
        self.device = jax.devices()[0]
        self.platform = self.device.platform
        self.log(f"{self.device.device_kind} ({self.platform}, {len(jax.devices())} device(s)), "
                 f"jax {jax.__version__}; sections: {', '.join(self.args.sections)}")
        self.write()
        if self.platform == "cpu" and not self.args.smoke:
            self.result["error"] = "JAX found no GPU"
            self.write()
            raise UsageError(f"JAX found no GPU here (its devices are {self.device.device_kind!r}"
                             "), and the full sizes are for one H100 or H200; install the JAX "
                             "CUDA plugin that matches jax (pip install \"jax[cuda13]==<jax "
                             "version>\") on a GPU machine, or add --smoke for the CPU.")
        sections = {"parity": self.parity, "cudnn": self.cudnn, "train": self.train,
                    "mfu": self.mfu, "memory": self.memory, "decode": self.decode}
        try:
            if "memory" in self.args.sections and not _missing_modules(("ml_collections",)):
                self._start_prediction(self._reference_accum())  # runs beside the GPU sections
            for name in self.args.sections:
                self.run_section(name, sections[name])
        finally:
            self._stop_prediction()
        self.result["summary"] = self.summary()
        self.write()
        print("\n".join(self.result["summary"]), flush=True)
        bad = [n for n, s in self.result["sections"].items() if s["status"] in ("error", "fail")]
        return 1 if bad else 0

    # -- parity ------------------------------------------------------------------------------------
    def parity(self) -> dict:
        import jax
        import numpy as np
        from reflex_jax.kernels import KernelChoices
        from reflex_jax.model import Decoder, ModelConfig, init_params
        try:
            cpu = jax.devices("cpu")[0]
        except RuntimeError as e:
            raise RuntimeError(f"the CPU backend is not available beside {self.platform} "
                               f"({_first_line(e)}); run with JAX_PLATFORMS unset or naming "
                               "cpu too") from None
        fields = dict(REFERENCE_BLOCKS, **self.sizes["parity_model"])
        B, T = self.sizes["parity_batch"], fields["block_size"]
        tokens = np.random.default_rng(0).integers(0, fields["vocab_size"], (B, T)).astype(np.int32)
        out: dict = {"device": self.device.device_kind, "reference": f"cpu ({cpu.device_kind})",
                     "model": {**fields, "batch": B}, "tolerance_rule":
                     f"{TOLERANCE_FACTOR} * eps(dtype) * sqrt(n_layer) * max|cpu logits| "
                     "(tests/tolerance.py)", "dtypes": {}}
        # float32 at "highest" (the check), at the default precision (a GPU may use TF32), bf16
        for label, dtype, precision in (("float32", "float32", "highest"),
                                        ("float32_default_precision", "float32", None),
                                        ("bfloat16", "bfloat16", None)):
            cfg = ModelConfig(**fields, dtype=dtype)
            with jax.default_device(cpu):
                params = init_params(cfg, jax.random.PRNGKey(0),
                                     model=Decoder(cfg, kernels=KernelChoices(platform="cpu")))
            logits, backends, programs = {}, {}, {}
            for where, dev in (("device", self.device), ("cpu", cpu)):
                p, t = jax.device_put(params, dev), jax.device_put(tokens, dev)
                if dev not in programs:  # a CPU-only machine: the device is the CPU, one compile
                    model = Decoder(cfg, kernels=KernelChoices(platform=dev.platform))
                    f = jax.jit(lambda p, t, model=model: model.apply({"params": p}, t))
                    with (jax.default_matmul_precision(precision) if precision
                          else contextlib.nullcontext()):
                        programs[dev] = f.lower(p, t).compile()
                compiled = programs[dev]
                backends[where] = _backend_in(compiled.as_text())
                logits[where] = np.asarray(jax.device_get(compiled(p, t)), np.float64)
            diff = float(np.max(np.abs(logits["device"] - logits["cpu"])))
            tol = _tolerance(logits["cpu"], cfg.n_layer, dtype)
            row = {"dtype": dtype, "matmul_precision": precision or "default",
                   "max_abs_diff": diff, "max_abs_logit": float(np.max(np.abs(logits["cpu"]))),
                   "tolerance": tol, "attention_backend": backends,
                   "finite": bool(np.all(np.isfinite(logits["device"])))}
            if label != "float32_default_precision":  # recorded, not checked: TF32 is allowed
                row["pass"] = bool(row["finite"] and diff <= tol)
            out["dtypes"][label] = row
        out["pass"] = all(r.get("pass", True) for r in out["dtypes"].values())
        out["status"] = "ok" if out["pass"] else "fail"
        return out

    # -- cuDNN at head size 192 --------------------------------------------------------------------
    def cudnn(self) -> dict:
        if self.platform != "gpu":
            return {"status": "skipped", "reason": f"not a GPU (the device is {self.platform}, "
                    f"{self.device.device_kind!r}); cuDNN attention runs on NVIDIA GPUs only"}
        return attention_variants(self.sizes, self.device)

    # -- the reference train step ------------------------------------------------------------------
    def _reference_accum(self) -> int:
        return reference_config(self.sizes, "all").grad_accum

    def train(self) -> dict:
        out: dict = {"config": "configs/reflex.py", "rows": {}, "attempts": []}
        accum = self._reference_accum()
        errors = []
        for schedule in ("all", "none"):
            try:
                row = self._train_measured(schedule, accum, out["attempts"])
            except Exception as e:  # noqa: BLE001 - the other schedule still runs
                out["rows"][schedule] = {"error": _first_line(e)[:1000],
                                         "traceback": traceback.format_exc()[-6000:]}
                errors.append(f"{schedule}: {_first_line(e)[:300]}")
                continue
            out["rows"][schedule] = self.train_rows[schedule] = row
            self.log(f"train {schedule}: {row['step_s'] * 1e3:.1f} ms/step, "
                     f"{row['tokens_per_s']:,.0f} tokens/s, compiled in {row['compile_s']:.1f} s, "
                     f"attention {row['attention_backend']}")
        c = reference_config(self.sizes, "all", self.train_accum)
        out["batch"] = {"batch_size": c.batch_size, "grad_accum": c.grad_accum,
                        "micro_batch": c.batch_size // c.grad_accum,
                        "seq_len": c.model.block_size,
                        "tokens_per_step": c.batch_size * c.model.block_size,
                        "reference_grad_accum": accum,
                        "note": ("the reference config's batch" if c.grad_accum == accum else
                                 "the reference batch in more micro-batches: the reference "
                                 "micro-batch ran out of memory")}
        out["dtype"], out["document_mask"] = c.model.dtype, bool(c.data.document_mask)
        out["dropout"], out["remat"] = c.model.dropout, c.remat
        if errors:
            out["status"], out["error"] = "error", "; ".join(errors)
        return out

    def _train_measured(self, schedule: str, accum: int, attempts: list) -> dict:
        """One schedule's row: the reference micro-batch, more micro-batches while it runs out of
        memory, and model.attention=xla once the reference's kernels fail otherwise."""
        batch = reference_config(self.sizes, schedule).batch_size
        ladder = [self.train_accum] if self.train_accum else _accum_ladder(batch, accum)
        i = 0
        while True:
            try:
                row = self._train_schedule(schedule, ladder[i], self.train_attention)
            except Exception as e:  # noqa: BLE001 - recorded; retried where another setting may run
                oom = _is_out_of_memory(e)
                attempts.append({"schedule": schedule, "grad_accum": ladder[i],
                                 "attention": self.train_attention or "the config's",
                                 "out_of_memory": oom, "error": _first_line(e)[:1000],
                                 "traceback": traceback.format_exc()[-3000:]})
                if oom and i + 1 < len(ladder):
                    self.log(f"train {schedule}: grad_accum {ladder[i]} ran out of memory; "
                             f"trying {ladder[i + 1]}")
                    i += 1
                    continue
                if not oom and self.train_attention is None:
                    self.train_attention = "xla"
                    self.log(f"train {schedule}: {_first_line(e)[:200]}; again with "
                             "model.attention=xla")
                    continue
                raise
            self.train_accum = ladder[i]
            return row

    def _train_schedule(self, schedule: str, accum: int, attention: Optional[str]) -> dict:
        import gc
        import numpy as np
        from reflex_jax.train import flops
        from reflex_jax.train.program import TrainProgram
        c = reference_config(self.sizes, schedule, accum)
        if attention:
            c.model.attention = attention
        program = TrainProgram(c)
        cfg, T = program.model_config, program.seq_len
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.vocab_size, (c.batch_size, T + 1)).astype(np.int32)
        local = {"tokens": tokens, "mask": np.ones(tokens.shape, np.float32)}
        if c.data.document_mask:
            from reflex_lab.bench.train import bench_documents  # documents of 1/8 to 1/2 a window
            local.update(bench_documents(tokens))
        stats_before = _memory_stats(self.device)
        state = program.init_state()
        batch = program.put_batch(local)
        t0 = time.perf_counter()
        compiled, warnings = _capturing_attention_warnings(
            lambda s=state, b=batch: program.train_step.lower(s, b).compile())
        compile_s = time.perf_counter() - t0
        hlo = compiled.as_text()
        losses, times = [], []
        for i in range(self.sizes["warmup_steps"] + self.sizes["timed_steps"]):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))  # waits for the step
            if i >= self.sizes["warmup_steps"]:
                times.append(time.perf_counter() - t)
        step_s = _median(times)
        n = program.mesh.size
        tokens_per_step = c.batch_size * T
        fpt = flops.train_flops_per_token(cfg, T)
        row = {"schedule": schedule, "schedule_table": cfg.schedule_table(),
               "grad_accum": accum, "attention": cfg.attention,
               "devices": n, "compile_s": compile_s, "step_s": step_s, "step_s_all": times,
               "tokens_per_s": tokens_per_step / step_s, "flops_per_token": fpt,
               "flops_per_token_causal_attention":
                   6 * flops.matmul_params(cfg) + flops.attention_flops_per_token(cfg, T) // 2,
               "model_flops_per_s": tokens_per_step * fpt / step_s,
               "loss_first": losses[0], "loss_last": losses[-1],
               "losses_finite": bool(all(math.isfinite(x) for x in losses)),
               "attention_backend": _backend_in(hlo), "cudnn_calls": _cudnn_calls(hlo),
               "attention_warnings": warnings}
        if schedule == "all":
            from reflex_jax.train.dry_run import _memory
            self.train_memory = {"compiled": _memory(compiled), "before": stats_before,
                                 "after_steps": _memory_stats(self.device),
                                 "grad_accum": accum}
        del state, batch, compiled
        gc.collect()
        return row

    # -- MFU -------------------------------------------------------------------------------------
    def mfu(self) -> dict:
        peak, source = datasheet_peak(self.device)
        if peak is None:
            return {"status": "skipped", "reason": source,
                    "model_flops_per_s": {k: r["model_flops_per_s"]
                                          for k, r in self.train_rows.items()}}
        out: dict = {"device_kind": self.device.device_kind, "peak_bf16_flops": peak,
                     "peak_source": source, "rows": {}}
        for schedule, r in self.train_rows.items():
            chips = peak * r["devices"]
            out["rows"][schedule] = {
                "mfu": r["model_flops_per_s"] / chips,
                "mfu_causal_attention": r["tokens_per_s"] * r["flops_per_token_causal_attention"]
                / chips}
        if "all" in out["rows"]:
            out["goal"] = {"what": f"reference-run MFU >= {GOAL_MFU:.0%} on an H100",
                           "mfu_all": out["rows"]["all"]["mfu"],
                           "met": out["rows"]["all"]["mfu"] >= GOAL_MFU}
        return out

    # -- memory against the dry run ------------------------------------------------------------------
    def _prediction_target(self) -> tuple[Optional[str], Optional[str]]:
        """(the dry run's compile target for this device, or None: this machine's own devices;
        a reason when the dry run has no target for it)."""
        import jax
        from reflex_jax.hardware import device_kind_chip
        if self.platform == "cpu":
            return None, None
        chip = device_kind_chip(self.device)
        if chip is None or chip.platform != "gpu":
            return None, (f"the dry run compiles for gpu:h100xN and gpu:h200xN only, not for "
                          f"{self.device.device_kind!r}")
        return f"gpu:{chip.name}x{len(jax.devices())}", None

    def _start_prediction(self, accum: int):
        target, reason = self._prediction_target()
        if reason:
            self._predictor = {"reason": reason, "grad_accum": accum}
            return
        folder = tempfile.mkdtemp(prefix="gpu_check_")
        spec = {"target": target, "grad_accum": accum, "smoke": bool(self.args.smoke),
                "out": os.path.join(folder, "prediction.json")}
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # deviceless GPU devices beside the CPU
        log = open(os.path.join(folder, "log.txt"), "w")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--predict_memory",
                                 json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        self._predictor = {"proc": proc, "spec": spec, "log": log, "folder": folder,
                           "grad_accum": accum, "started": time.perf_counter()}

    def _prediction(self, accum: int) -> dict:
        if self._predictor is None or self._predictor["grad_accum"] != accum:
            self._stop_prediction()
            self._start_prediction(accum)
        pred = self._predictor
        if "reason" in pred:
            return {"skipped": pred["reason"]}
        wait = max(30.0, self.sizes["predict_timeout_s"] - (time.perf_counter() - pred["started"]))
        try:
            rc = pred["proc"].wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self._stop_prediction()
            return {"error": f"the dry-run subprocess did not finish within {wait:.0f} s more"}
        pred["log"].close()
        with open(os.path.join(pred["folder"], "log.txt")) as f:
            said = f.read()
        if rc != 0 or not os.path.exists(pred["spec"]["out"]):
            return {"error": f"the dry-run subprocess exited with status {rc}",
                    "log_tail": said[-3000:]}
        with open(pred["spec"]["out"]) as f:
            rep = json.load(f)
        rep["attention_warnings"] = [ln for ln in said.splitlines() if ln.startswith("attention:")]
        rep["wall_s"] = time.perf_counter() - pred["started"]
        return rep

    def _stop_prediction(self):
        pred, self._predictor = self._predictor, None
        if pred and "proc" in pred:
            if pred["proc"].poll() is None:
                pred["proc"].kill()
                pred["proc"].wait()
            pred["log"].close()

    def memory(self) -> dict:
        mem = self.train_memory
        if not mem:
            return {"status": "skipped", "reason": "the train section did not measure the `all` "
                    "step, whose memory this section reads"}
        compiled = mem.get("compiled") or {}
        after = mem.get("after_steps")
        out: dict = {"grad_accum": mem.get("grad_accum"),
                     "compiled_on_device": compiled or None,
                     "allocator_before_train": mem.get("before"),
                     "allocator_after_train": after}
        if after is None:
            out["allocator_note"] = (f"the {self.platform} backend reports no memory_stats(), so "
                                     "there is no measured peak")
        measured = (after or {}).get("peak_bytes_in_use")
        rep = self._prediction(mem["grad_accum"])
        predicted = None
        if "per_device_bytes" in rep:
            predicted = rep["per_device_bytes"].get("total")
            out["predicted"] = {
                "target": rep.get("target"), "device_kind": rep.get("device_kind"),
                "train_step": rep["functions"]["train_step"].get("memory"),
                "train_step_refused": rep["functions"]["train_step"].get("out_of_memory"),
                "params_bytes": rep["per_device_bytes"]["params"],
                "opt_state_bytes": rep["per_device_bytes"]["opt_state"],
                "peak_total_bytes": rep.get("peak_total_bytes"), "fits": rep.get("fits"),
                "hbm_bytes": rep.get("hbm_bytes"), "compile_s": rep.get("compile_s"),
                "attention_warnings": rep.get("attention_warnings"),
                "subprocess_wall_s": rep.get("wall_s")}
        else:
            out["predicted"] = rep
        ratios = {}
        if predicted:
            if measured:
                ratios["measured_peak_over_predicted_train_step"] = measured / predicted
            if compiled.get("total"):
                ratios["device_compiled_over_predicted_train_step"] = compiled["total"] / predicted
        out["ratios"] = ratios
        if "error" in rep:
            out["status"], out["error"] = "error", f"the dry-run prediction failed: {rep['error']}"
        return out

    # -- decoding against HF generate --------------------------------------------------------------
    def decode(self) -> dict:
        return decode_section(self.sizes, self.device, self.log)

    # -- the summary -----------------------------------------------------------------------------
    def summary(self) -> list[str]:
        s = self.result["sections"]
        lines = [f"{PROG}: {self.device.device_kind} ({self.platform}), jax "
                 f"{self.result['versions'].get('jax')}, {self.elapsed():.0f} s"
                 + (", SMOKE sizes" if self.args.smoke else "")]
        for name, sec in s.items():
            try:
                text = "" if sec["status"] == "skipped" else _SUMMARY[name](sec)
            except Exception as e:  # noqa: BLE001 - a summary line must not end the run
                text = f"(no summary: {_first_line(e)})"
            if sec["status"] in ("skipped", "error"):
                why = sec.get("reason") or sec.get("error") or ""
                text = f"{text}; {why}" if text else why
            lines.append(f"  {name:7s} {sec['status']:7s} {text}")
        return lines


def _summary_parity(p: dict) -> str:
    return "; ".join(f"{k} max|diff| {r['max_abs_diff']:.3g} (tol {r['tolerance']:.3g}, "
                     f"{r['attention_backend']['device']})" for k, r in p["dtypes"].items())


def _summary_cudnn(c: dict) -> str:
    return "; ".join(f"{k}: {v['backend']}" + (f" ({v.get('refusal') or v.get('error')})"
                                                if v.get("refusal") or v.get("error") else "")
                     for k, v in c["variants"].items())


def _summary_train(t: dict) -> str:
    rows = "; ".join(f"{k} {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
                     f"compile {r['compile_s']:.0f} s, {r['attention_backend']} attention"
                     for k, r in t["rows"].items() if "step_s" in r)
    b = t.get("batch")
    return rows + (f" (batch {b['batch_size']} x grad_accum {b['grad_accum']})" if b else "")


def _summary_mfu(m: dict) -> str:
    text = ", ".join(f"{k} {r['mfu']:.1%}" for k, r in m["rows"].items())
    text += f" of {m['peak_bf16_flops'] / 1e12:.1f} TFLOP/s"
    if "goal" in m:
        text += f"; goal >= {GOAL_MFU:.0%}: {'met' if m['goal']['met'] else 'NOT met'}"
    return text


def _summary_memory(m: dict) -> str:
    pred = m.get("predicted") or {}
    peak = (m.get("allocator_after_train") or {}).get("peak_bytes_in_use")
    return (f"peak {_gib(peak)} measured, {_gib((m.get('compiled_on_device') or {}).get('total'))}"
            f" compiled here, {_gib((pred.get('train_step') or {}).get('total'))} predicted by the "
            f"dry run" + (f" for {pred['target']}" if pred.get("target") else "")
            + (f" ({pred.get('skipped') or pred.get('error')})"
               if pred.get("skipped") or pred.get("error") else ""))


def _summary_decode(d: dict) -> str:
    text = "; ".join(f"batch {r['batch']}: all {r['all_tok_s']:,.0f} tok/s, vanilla "
                     f"{r['vanilla_tok_s']:,.0f}" + (f", HF {r['hf_tok_s']:,.0f} "
                                                     f"({r['vanilla_vs_hf']:.2f}x)"
                                                     if r.get("hf_tok_s") else "")
                     for r in d["rows"])
    return text + (f" [HF skipped: {d['hf_skipped']}]" if d.get("hf_skipped") else "")


_SUMMARY = {"parity": _summary_parity, "cudnn": _summary_cudnn, "train": _summary_train,
            "mfu": _summary_mfu, "memory": _summary_memory, "decode": _summary_decode}


def _accum_ladder(batch: int, accum: int) -> list[int]:
    """grad_accum values from the reference's up to one row per micro-batch, doubling."""
    out, a = [], accum
    while a <= batch:
        if batch % a == 0:
            out.append(a)
        a *= 2
    return out or [accum]


def _memory_stats(device) -> Optional[dict]:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if not stats:
        return None
    return {k: int(v) for k, v in stats.items() if isinstance(v, (int, float))}


def reference_config(sizes: dict, schedule: str, grad_accum: Optional[int] = None):
    """configs/reflex.py with random weights (no init_from), schedule `schedule`; the smoke sizes
    shrink the model and batch."""
    from reflex_jax.run_config import load_config
    c = load_config(os.path.join(ROOT, "configs", "reflex.py"))
    c.init_from = ""  # speed and memory do not depend on the weights
    c.model.head_plan = schedule
    for k, v in sizes["train_model"].items():
        c.model[k] = v
    if sizes["train_batch"]:
        c.batch_size, c.grad_accum = sizes["train_batch"]
    if grad_accum:
        c.grad_accum = grad_accum
    return c


# ---- the cuDNN section's variants ------------------------------------------------------------------

def attention_variant(cfg, params, tokens, documents: Optional[dict], platform: str,
                      reps: int) -> dict:
    """A jitted loss + gradients of `cfg` on `platform`: which attention kernel the compiled HLO
    holds, the refusal sentence of an explicit backend or auto's reason to fall back, the median
    time of a call, and the logits and gradients (numpy, for comparisons)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from reflex_jax.errors import ReflexError
    from reflex_jax.kernels import KernelChoices
    from reflex_jax.model import Decoder
    model = Decoder(cfg, kernels=KernelChoices(platform=platform))
    seg = pos = None
    if documents is not None:
        seg, pos = jnp.asarray(documents["segment_ids"]), jnp.asarray(documents["positions"])

    def loss(params, tokens_BT):
        logits = model.apply({"params": params}, tokens_BT[:, :-1], segment_ids_BT=seg,
                             positions_BT=pos)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             tokens_BT[:, 1:])
        return jnp.mean(ce), logits

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    row: dict = {"attention": cfg.attention}
    t0 = time.perf_counter()
    try:
        compiled, warnings = _capturing_attention_warnings(
            lambda: f.lower(params, tokens).compile())
    except ReflexError as e:  # an explicit backend that cannot take the call says why
        row.update(backend="refused", refusal=str(e))
        return row
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN failing inside XLA: the other variants go on
        row.update(backend="error", error=_first_line(e)[:1000],
                   traceback=traceback.format_exc()[-3000:])
        return row
    row["compile_s"] = time.perf_counter() - t0
    hlo = compiled.as_text()
    row.update(backend=_backend_in(hlo), cudnn_calls=_cudnn_calls(hlo),
               fallback_warnings=warnings)
    try:
        (value, logits), grads = compiled(params, tokens)
        jax.block_until_ready(grads)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens))
            times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - compiled but failed to run
        row.update(error=f"compiled but failed to run: {_first_line(e)[:1000]}",
                   traceback=traceback.format_exc()[-3000:])
        return row
    row.update(loss=float(value), fwd_bwd_ms=_median(times) * 1e3,
               _logits=np.asarray(logits, np.float64),
               _grads=[np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)])
    return row


def attention_variants(sizes: dict, device) -> dict:
    import jax
    import numpy as np
    from reflex_jax.kernels import KernelChoices
    from reflex_jax.model import Decoder, ModelConfig, init_params
    from reflex_lab.bench.train import bench_documents
    fields = dict(REFERENCE_BLOCKS, **sizes["cudnn_model"], dtype="bfloat16")
    xla = ModelConfig(**fields, attention="xla")  # the params are the same for every backend
    params = init_params(xla, jax.random.PRNGKey(0),
                         model=Decoder(xla, kernels=KernelChoices(platform=device.platform)))
    B, T = sizes["cudnn_batch"], fields["block_size"]
    tokens = np.random.default_rng(0).integers(0, fields["vocab_size"], (B, T + 1)).astype(np.int32)
    docs = {k: v[:, :-1] for k, v in bench_documents(tokens).items()}
    out: dict = {"device": device.device_kind,
                 "compute_capability": getattr(device, "compute_capability", None),
                 "model": {**fields, "batch": B},
                 "head_dim": fields["n_embd"] // fields["n_head"], "variants": {}}
    for label, documents in (("causal", None), ("documents", docs)):
        rows = {a: attention_variant(ModelConfig(**fields, attention=a), params, tokens,
                                     documents, device.platform, sizes["cudnn_reps"])
                for a in ("cudnn", "auto", "xla")}
        ref = rows["xla"]
        for a, row in rows.items():
            if "_logits" in row and a != "xla":
                tol = _tolerance(ref["_logits"], fields["n_layer"], "bfloat16")
                diff = float(np.max(np.abs(row["_logits"] - ref["_logits"])))
                gdiff = max(float(np.max(np.abs(g - r))) for g, r in zip(row["_grads"], ref["_grads"]))
                gscale = max(float(np.max(np.abs(r))) for r in ref["_grads"])
                row["vs_xla"] = {"logits_max_abs_diff": diff, "logits_tolerance": tol,
                                 "grads_max_abs_diff": gdiff, "grads_max_abs": gscale,
                                 "loss_diff": row["loss"] - ref["loss"],
                                 "pass": bool(diff <= tol)}
            row.pop("_logits", None)
            row.pop("_grads", None)
            out["variants"][f"{a} {label}"] = row
    out["cudnn_taken_by_auto"] = {k: out["variants"][f"auto {k}"]["backend"] == "cudnn"
                                  for k in ("causal", "documents")}
    out["refusals"] = {k: v["refusal"] for k, v in out["variants"].items() if v.get("refusal")}
    out["auto_fallback_reasons"] = sorted({w for k, v in out["variants"].items()
                                           for w in v.get("fallback_warnings", [])})
    checked = [v["vs_xla"]["pass"] for v in out["variants"].values() if "vs_xla" in v]
    errors = [k for k, v in out["variants"].items() if v.get("error")]
    if errors:
        out["errors"] = {k: out["variants"][k]["error"] for k in errors}
    out["status"] = "ok" if all(checked) and not errors else "fail"
    return out


# ---- the decode section ----------------------------------------------------------------------------

def _hf_generate(model, prompts_BP, n: int, device: str):
    import numpy as np
    import torch
    ids = torch.from_numpy(np.asarray(prompts_BP, np.int64)).to(device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                             eos_token_id=None)
    return out[:, ids.shape[1]:].cpu().numpy()  # .cpu() waits for the GPU


def _hf_model(vcfg, platform: str) -> tuple[Any, Optional[dict], Optional[str], Optional[str]]:
    """(HF GPT2LMHeadModel on the device in bfloat16 or None, the same weights as this project's
    params or None, the torch device, why HF is skipped or None)."""
    try:
        import torch
    except ImportError as e:
        return None, None, None, f"torch is not installed ({_first_line(e)})"
    try:
        from reflex_lab.bench.generation import hf_gpt2_and_params
        model, params = hf_gpt2_and_params(vcfg)
    except Exception as e:  # noqa: BLE001 - no transformers, or an incompatible one
        return None, None, None, f"HF GPT-2 could not be built ({_first_line(e)[:300]})"
    if platform == "gpu" and not torch.cuda.is_available():
        return None, params, None, (f"torch {torch.__version__} sees no CUDA device "
                                    "(torch.cuda.is_available() is false)")
    device = "cuda" if platform == "gpu" else "cpu"
    return model.to(device=device, dtype=torch.bfloat16), params, device, None


def decode_section(sizes: dict, device, log) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from reflex_jax.model import ModelConfig, init_params
    from reflex_jax.sampling import Generator
    from reflex_lab.bench.timing import interleaved
    P, N = sizes["decode_prompt"], sizes["decode_new"]
    base = dict(REFERENCE_BLOCKS, **sizes["decode_model"], block_size=P + N, dtype="bfloat16",
                param_dtype="bfloat16")
    cfg_all = ModelConfig(**base)
    cfg_vanilla = ModelConfig(**dict(base, head_plan="none", norm="layernorm", mlp="gelu",
                                     norm_eps=1e-5))
    out: dict = {"dtype": "bfloat16 (params and compute, both sides)", "prompt": P,
                 "new_tokens": N, "greedy": True, "reps": sizes["decode_reps"],
                 "timed": "end to end per call: prefill + decode of every new token",
                 "models": {"all": cfg_all.schedule_table(), "vanilla": "GPT-2 twin of HF's"},
                 "rows": []}
    hf, vparams, hf_device, skipped = _hf_model(cfg_vanilla, device.platform)
    if skipped:
        out["hf_skipped"] = skipped
    if vparams is None:
        vparams = init_params(cfg_vanilla, jax.random.PRNGKey(1))
    to_bf16 = functools.partial(jax.tree_util.tree_map, lambda x: jnp.asarray(x, jnp.bfloat16))
    vparams = jax.device_put(to_bf16(vparams), device)
    aparams = jax.device_put(to_bf16(init_params(cfg_all, jax.random.PRNGKey(0))), device)
    gens = {"all": Generator(cfg_all), "vanilla": Generator(cfg_vanilla)}
    rng = np.random.default_rng(2)
    for B in sizes["decode_batches"]:
        prompts = rng.integers(0, cfg_all.vocab_size, (B, P)).astype(np.int32)
        plist = prompts.tolist()
        fns = {"all": lambda p=plist: gens["all"].generate(aparams, p, max_new_tokens=N),
               "vanilla": lambda p=plist: gens["vanilla"].generate(vparams, p, max_new_tokens=N)}
        if hf is not None:
            fns["hf"] = lambda p=prompts: _hf_generate(hf, p, N, hf_device)
        first = {}
        compile_s = {}
        for k, fn in fns.items():  # compiles (ours), warms up (HF), and the greedy tokens
            t = time.perf_counter()
            first[k] = np.asarray(fn())
            compile_s[k] = time.perf_counter() - t
        times = interleaved(fns, sizes["decode_reps"])
        row = {"batch": B, "first_call_s": compile_s,
               **{f"{k}_tok_s": B * N / _median(v) for k, v in times.items()},
               **{f"{k}_s": _median(v) for k, v in times.items()}}
        if hf is not None:
            row["vanilla_vs_hf"] = row["vanilla_tok_s"] / row["hf_tok_s"]
            row["all_vs_hf"] = row["all_tok_s"] / row["hf_tok_s"]
            row["greedy_token_agreement_vanilla_hf"] = float(np.mean(first["vanilla"] == first["hf"]))
        out["rows"].append(row)
        log(f"decode batch {B}: " + ", ".join(f"{k} {row[f'{k}_tok_s']:,.0f} tok/s" for k in fns))
    if hf is not None:
        import torch
        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "device": hf_device}
    return out


# ---- the dry-run subprocess --------------------------------------------------------------------

def predict_memory(spec_text: str) -> int:
    """The dry run (reflex_jax.train.dry_run.report) of the reference train step for the target
    named in the spec, deviceless (JAX_PLATFORMS=cpu), or for this machine's own devices."""
    from reflex_jax.hardware import quiet_environment, resolve_target
    quiet_environment()
    spec = json.loads(spec_text)
    from reflex_jax.train.program import TrainProgram
    sizes = SMOKE if spec["smoke"] else FULL
    c = reference_config(sizes, "all", spec["grad_accum"])
    target = resolve_target(spec["target"]) if spec["target"] else None
    program = TrainProgram(c, devices=list(target.devices) if target else None)
    _, rep = program.dry_run(target, log=print)
    with open(spec["out"], "w") as f:
        json.dump(rep, f, default=str)
    return 0


def main(argv=None) -> int:
    from reflex_jax.cli import exit_on_user_error
    with exit_on_user_error(PROG):
        args = parse_args(argv)
        if args.predict_memory:
            return predict_memory(args.predict_memory)
        from reflex_jax.hardware import quiet_cpu_only
        quiet_cpu_only()  # before JAX starts: no CUDA plugin noise on a machine without a GPU
        return Check(args).main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
