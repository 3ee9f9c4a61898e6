"""The pieces of bench.py (issue 8): contenders, interleaved timing, memory, generation, report.

Everything runs in one process on one machine, so the ratios compare like with like:

* peak: large float32 and bfloat16 matmuls in JAX and in PyTorch; the peak of a dtype is the faster
  of the two (medians), measured between the training steps so it sees the same machine load;
* training: this project's train step (a real `Trainer` over a tiny built-in task, the very
  executable `train.py` runs) for the `all` and `none` schedules, against the same architecture
  written plainly in PyTorch (`TorchGPT`, nanoGPT style, `scaled_dot_product_attention`), eager and
  `torch.compile`, with the same weights, batch, AdamW and clipping;
* generation: KV-cache `Generator` vs re-running the whole prefix per token (what the original
  did), and for the vanilla GPT-2 config against HF `GPT2LMHeadModel.generate` on the same weights;
* KV-cache bytes, reflex vs vanilla.

Timed repetitions of the contenders alternate (A B C, C B A, ...) and the report uses medians.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fractions
import io
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import flops, malloc_tuning
from .config import ModelConfig


# ---- settings -------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchSettings:
    vocab_size: int = 50257
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 256
    batch: int = 8
    dtypes: tuple[str, ...] = ()      # compute dtypes, first = headline; () = default_dtypes()
    train_reps: int = 5
    peak_n: int = 2048                # square matmul size for the peak
    train: bool = True
    torch: bool = True
    torch_compile: bool = True
    gen: bool = True
    gen_prompts: tuple[int, ...] = (128, 512, 1024)
    gen_batches: tuple[int, ...] = (1, 8)
    gen_new_tokens: int = 64          # cached / HF: new tokens per call, prefill included
    gen_recompute_tokens: int = 2     # prefix re-run: new tokens timed (each is a full forward)
    gen_reps: int = 2
    hf: bool = True
    attention: str = "xla"            # model.attention of this project's models (cudnn: GPUs)
    name: str = "default"

    @classmethod
    def preset(cls, name: str) -> "BenchSettings":
        if name == "default":
            return cls()
        if name == "quick":  # ~2-3 minutes on 2 quiet cores: one dtype, small model
            return cls(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=8, train_reps=3,
                       dtypes=default_dtypes()[:1], peak_n=1024, gen_prompts=(128, 512),
                       gen_batches=(1, 8), gen_new_tokens=32, gen_recompute_tokens=1, gen_reps=2,
                       name="quick")
        if name == "smoke":  # seconds; for the tests (no torch.compile)
            return cls(vocab_size=512, n_layer=2, n_head=4, n_embd=32, block_size=16, batch=2,
                       dtypes=("float32",), train_reps=1, peak_n=128, torch_compile=False,
                       gen_prompts=(16,), gen_batches=(2,), gen_new_tokens=4,
                       gen_recompute_tokens=1, gen_reps=1, name="smoke")
        raise ValueError(f"unknown bench preset {name!r}; use default, quick or smoke.")

    def __post_init__(self):
        if not self.dtypes:
            self.dtypes = default_dtypes()

    def model_fields(self, reflex: str, dtype: str, **over) -> dict:
        d = dict(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                 n_head=self.n_head, n_embd=self.n_embd, norm="rmsnorm", mlp="swiglu", bias=True,
                 pos_emb="learned", tie_embeddings=True, dropout=0.0, dtype=dtype,
                 param_dtype="float32", reflex=reflex, attention=self.attention)
        d.update(over)
        return d


# ---- environment ----------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_dtypes() -> tuple[str, ...]:
    """bfloat16 first where the CPU has bf16 dot instructions (the fast path), then float32."""
    if jax.default_backend() != "cpu" or {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return ("bfloat16", "float32")
    return ("float32",)


def environment() -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cores": cpu_count(), "load_avg_start": os.getloadavg()[0],
           "jax": jax.__version__, "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "avx512_bf16": "avx512_bf16" in cpu_flags(),
           # malloc settings (reflex_jax/malloc_tuning.py): the same for every contender
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "thp": malloc_tuning.thp_mode()}
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


# ---- timing and memory ----------------------------------------------------------------------------

def interleaved(fns: dict[str, Callable[[], Any]], reps: int,
                log: Callable[[str], None] = lambda s: None,
                warmup_rounds: int = 0) -> dict[str, list[float]]:
    """Wall seconds of `reps` calls of every fn, alternating the order (A B C, C B A, ...), after
    `warmup_rounds` untimed rounds (caches; with the malloc tuning, the heap grows until it holds
    every contender's buffers, so the first rounds in one process are not steady)."""
    names = list(fns)
    for _ in range(warmup_rounds):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            log(f"  rep {r + 1}/{reps} {n}: {times[n][-1]:.3f} s")
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak_during(fn: Callable[[], Any], interval: float = 0.002) -> tuple[Any, int]:
    """(fn(), peak resident memory above the level before the call, in bytes; sampled)."""
    try:
        base = _rss_bytes()
    except OSError:
        return fn(), -1
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return out, peak[0] - base


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ---- peak ---------------------------------------------------------------------------------------

def jax_matmul(n: int, dtype: str) -> Callable[[], Any]:
    """n x n x n matmul accumulating in float32 (for bf16 the fast XLA:CPU path; a bf16-output
    dot runs as an f32 dot plus converts there, and the model never uses that form)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    return lambda: f(a, b).block_until_ready()


def torch_matmul(n: int, dtype: str) -> Callable[[], Any]:
    import torch
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    a @ b
    return lambda: a @ b


# ---- this project's train step ------------------------------------------------------------------

def make_trainer(model_fields: dict, batch: int, run_dir: str):
    """A real `Trainer` (train.py's code path) over a tiny generated task: its `train_step` is the
    compiled step users train with. Data loading is not timed; the bench feeds its own batch."""
    from .defaults import base_config
    from .trainer import Trainer
    c = base_config()
    for k, v in model_fields.items():
        c.model[k] = v
    c.data.task, c.data.tokenizer, c.data.loss_on = "arith", "bytes", "all"
    c.data.task_rows, c.data.task_val_rows = 64, 8
    c.run_dir, c.batch_size, c.grad_accum = run_dir, batch, 1
    c.eval_exact_match, c.eval_interval = 0, 0
    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(c, log=lambda s: None)


class JaxTrain:
    """One schedule/dtype of this project's train step, compiled ahead of time (same executable)."""

    def __init__(self, settings: BenchSettings, reflex: str, dtype: str, tokens_np, run_dir: str):
        self.kind, self.reflex, self.dtype = "jax", reflex, dtype
        self.trainer = make_trainer(settings.model_fields(reflex, dtype), settings.batch, run_dir)
        self.cfg = self.trainer.cfg
        state = self.trainer.init_state()
        self.init_params = jax.device_get(state.params)
        self.tokens, self.mask = self.trainer.put_batch(
            {"tokens": tokens_np, "mask": np.ones(tokens_np.shape, np.float32)})
        t0 = time.perf_counter()
        self.compiled = self.trainer.train_step.lower(state, self.tokens, self.mask).compile()
        self.compile_s = time.perf_counter() - t0
        self.state = state
        mem = self.compiled.memory_analysis()
        self.memory = None
        if mem is not None:
            self.memory = {"temp_bytes": int(mem.temp_size_in_bytes),
                           "argument_bytes": int(mem.argument_size_in_bytes),
                           "output_bytes": int(mem.output_size_in_bytes),
                           "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0))}
        self.losses: list[float] = []

    def step(self) -> float:
        self.state, m = self.compiled(self.state, self.tokens, self.mask)
        loss = float(m["loss"])  # blocks until the step is done
        self.losses.append(loss)
        return loss


# ---- the PyTorch peer -------------------------------------------------------------------------------

def torch_model_class():
    """TorchGPT: the same architecture written plainly in PyTorch (nanoGPT style)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class Attention(tnn.Module):
        def __init__(self, cfg: ModelConfig, layer: int):
            super().__init__()
            self.cfg, self.plan = cfg, cfg.layers[layer]
            H, K, D, E = cfg.n_head, self.plan.n_self, cfg.head_dim, cfg.n_embd
            # Q for all H heads, K/V for the K self heads only, in one projection
            self.c_attn = tnn.Linear(E, (H + 2 * K) * D, bias=cfg.bias)
            self.c_proj = tnn.Linear(H * D, E, bias=cfg.bias)

        def forward(self, x, earlier):
            B, T, _ = x.shape
            H, K, D = self.cfg.n_head, self.plan.n_self, self.cfg.head_dim
            q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=2)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, K, D).transpose(1, 2)
            v = v.view(B, T, K, D).transpose(1, 2)
            ks, vs = [k], [v]
            for g in self.plan.cross:  # cross heads read the source layer's last c self heads
                lo, hi = g.source_heads[0], g.source_heads[-1] + 1
                ks.append(earlier[g.source][0][:, lo:hi])
                vs.append(earlier[g.source][1][:, lo:hi])
            k_all = torch.cat(ks, 1) if len(ks) > 1 else k
            v_all = torch.cat(vs, 1) if len(vs) > 1 else v
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)), (k, v)

    class MLP(tnn.Module):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            E, F_ = cfg.n_embd, cfg.hidden
            self.swiglu = cfg.mlp == "swiglu"
            if self.swiglu:
                self.gate = tnn.Linear(E, F_, bias=cfg.bias)
                self.up = tnn.Linear(E, F_, bias=cfg.bias)
                self.down = tnn.Linear(F_, E, bias=cfg.bias)
            else:
                self.fc = tnn.Linear(E, F_, bias=cfg.bias)
                self.proj = tnn.Linear(F_, E, bias=cfg.bias)

        def forward(self, x):
            if self.swiglu:
                return self.down(F.silu(self.gate(x)) * self.up(x))
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))

    def norm(cfg):
        if cfg.norm == "rmsnorm":
            return tnn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        return tnn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)

    class Block(tnn.Module):
        def __init__(self, cfg: ModelConfig, layer: int):
            super().__init__()
            self.ln_1, self.attn = norm(cfg), Attention(cfg, layer)
            self.ln_2, self.mlp = norm(cfg), MLP(cfg)

        def forward(self, x, earlier):
            a, own = self.attn(self.ln_1(x), earlier)
            x = x + a
            return x + self.mlp(self.ln_2(x)), own

    class TorchGPT(tnn.Module):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            if cfg.pos_emb != "learned" or not cfg.tie_embeddings:
                raise ValueError("TorchGPT covers learned positions and a tied head only.")
            self.cfg = cfg
            self.wte = tnn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = tnn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = tnn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
            self.ln_f = norm(cfg)
            self.lm_head = tnn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight  # tied

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            earlier = []
            for block in self.h:
                x, own = block(x, tuple(earlier))
                earlier.append(own)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    return TorchGPT


def torch_state_from_jax(cfg: ModelConfig, params) -> dict:
    """TorchGPT state dict holding exactly the JAX params (so both sides start from the same weights)."""
    import torch
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    E, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    sd = {"wte.weight": t(params["wte"]), "wpe.weight": t(params["wpe"]),
          "lm_head.weight": t(params["wte"])}

    def norm(dst, src):
        sd[f"{dst}.weight"] = t(src["scale"])
        if cfg.norm == "layernorm" and cfg.bias:
            sd[f"{dst}.bias"] = t(src["bias"])

    def linear(dst, kernel_in_out, bias=None):
        sd[f"{dst}.weight"] = t(np.asarray(kernel_in_out).T)
        if cfg.bias:
            sd[f"{dst}.bias"] = t(bias)

    for i, plan in enumerate(cfg.layers):
        p, K = params[f"h_{i}"], plan.n_self
        norm(f"h.{i}.ln_1", p["ln_1"])
        norm(f"h.{i}.ln_2", p["ln_2"])
        a = p["attn"]
        kern = np.concatenate([np.asarray(a["q"]["kernel"]).reshape(E, H * D),
                               np.asarray(a["k"]["kernel"]).reshape(E, K * D),
                               np.asarray(a["v"]["kernel"]).reshape(E, K * D)], axis=1)
        bias = (np.concatenate([np.asarray(a[n]["bias"]).reshape(-1) for n in ("q", "k", "v")])
                if cfg.bias else None)
        linear(f"h.{i}.attn.c_attn", kern, bias)
        linear(f"h.{i}.attn.c_proj", np.asarray(a["o"]["kernel"]).reshape(H * D, E),
               a["o"]["bias"] if cfg.bias else None)
        m = p["mlp"]
        names = ("gate", "up", "down") if cfg.mlp == "swiglu" else ("fc", "proj")
        for n in names:
            linear(f"h.{i}.mlp.{n}", m[n]["kernel"], m[n]["bias"] if cfg.bias else None)
    norm("ln_f", params["ln_f"])
    return sd


def _torch_adamw(model, optim_cfg):
    """AdamW with optax's decay mask (matrices only; no embeddings, biases, norm scales)."""
    import torch
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        is_matrix = p.dim() >= 2 and top not in ("wte", "wpe", "lm_head")
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


class TorchTrain:
    """TorchGPT + AdamW + grad clipping, eager or torch.compile, float32 or bf16 autocast."""

    def __init__(self, cfg: ModelConfig, params, tokens_np, dtype: str, compiled: bool):
        import torch
        from .defaults import base_config
        self.kind, self.reflex, self.dtype = "torch.compile" if compiled else "torch eager", \
            cfg.reflex, dtype
        self.cfg = cfg
        model = torch_model_class()(cfg)
        missing = model.load_state_dict(torch_state_from_jax(cfg, params), strict=True)
        del missing
        self.model = model.train()
        optim_cfg = base_config().optim
        self.opt, self.opt_impl = _torch_adamw(model, optim_cfg)
        self.clip = optim_cfg.clip
        self.fwd = torch.compile(model) if compiled else model
        tok = torch.from_numpy(np.asarray(tokens_np, np.int64))
        self.x, self.y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
        self.bf16 = dtype == "bfloat16"
        self.losses: list[float] = []
        self.compile_s = 0.0
        if compiled:  # compile forward and backward now (timed apart); no update, same weights
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                self.fwd(self.x, self.y).backward()
            self.opt.zero_grad(set_to_none=True)
            self.compile_s = time.perf_counter() - t0

    def step(self) -> float:
        import torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.fwd(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.losses.append(value)
        return value


# ---- ablation: what each optimisation of the train step buys ---------------------------------------

@contextlib.contextmanager
def _without(optimisations: Sequence[str]):
    """Temporarily swap this project's optimised pieces for their plain versions (while a train
    step traces and compiles): 'fused_loss' -> log-softmax over [B, T, vocab] float32 logits,
    'dense' -> flax nn.DenseGeneral with autodiff, 'attn_blocks' -> one dense causal call,
    'flash_attn' -> autodiff through the query-blocked call instead of the written-out backward."""
    import flax.linen as nn
    from . import attention, model, trainer
    saved = (trainer.fused_cross_entropy_sum, model._dense, attention.causal_blocks,
             attention.flash_query_block)

    def plain_loss(h, head, targets, weights):
        return jnp.sum(trainer.token_cross_entropy(h, head, targets) * weights)

    def plain_dense(cfg, features, axes, std, name, axis=-1):
        bias_axes = axes[-1:] if isinstance(features, int) else axes[-len(features):]
        return nn.DenseGeneral(features, axis=axis, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                               param_dtype=cfg.params_dtype, kernel_init=model._init(std, axes),
                               bias_init=model._zeros(bias_axes), name=name)
    try:
        if "fused_loss" in optimisations:
            trainer.fused_cross_entropy_sum = plain_loss
        if "dense" in optimisations:
            model._dense = plain_dense
        if "attn_blocks" in optimisations:
            attention.causal_blocks = lambda t_len: 1
        if "flash_attn" in optimisations:
            attention.flash_query_block = lambda t_len: 0
        yield
    finally:
        (trainer.fused_cross_entropy_sum, model._dense, attention.causal_blocks,
         attention.flash_query_block) = saved


ABLATION_STEPS = (("plain jit port", ("fused_loss", "dense", "attn_blocks", "flash_attn")),
                  ("+ fused chunked loss", ("dense", "attn_blocks", "flash_attn")),
                  ("+ Dense fwd/bwd (f32-accumulating dots, f32 bias sums)",
                   ("attn_blocks", "flash_attn")),
                  ("+ causal attention in query blocks (autodiff)", ("flash_attn",)),
                  ("+ blockwise attention, written-out backward (= this project)", ()))


def ablation(s: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Train-step time of the `all` schedule with the optimisations switched on one by one, all
    variants interleaved in one process (same machine noise), for every dtype."""
    tmp = tempfile.mkdtemp(prefix="reflex_ablation_")
    tokens = np.random.default_rng(0).integers(0, s.vocab_size, (s.batch, s.block_size + 1)).astype(np.int32)
    out: dict = {"settings": dataclasses.asdict(s), "env": environment(), "rows": []}
    for dtype in s.dtypes:
        variants = {}
        for i, (label, off) in enumerate(ABLATION_STEPS):
            with _without(off):
                c = JaxTrain(s, "all", dtype, tokens, os.path.join(tmp, f"{dtype}_{i}"))
            variants[label] = c
            log(f"  {dtype} {label}: compiled in {c.compile_s:.1f} s; XLA temp "
                f"{_mib((c.memory or {}).get('temp_bytes'))}")
        times = interleaved({k: c.step for k, c in variants.items()}, s.train_reps, log,
                            warmup_rounds=2)
        base = prev = None
        for label, c in variants.items():
            t = median(times[label])
            base = base or t
            out["rows"].append({"dtype": dtype, "variant": label, "step_s": t, "step_s_all": times[label],
                                "vs_previous": (prev / t) if prev else None, "vs_plain": base / t,
                                "xla_temp_bytes": (c.memory or {}).get("temp_bytes"),
                                "loss_first": c.losses[0]})
            prev = t
    out["env"]["load_avg_end"] = os.getloadavg()[0]
    return out


def ablation_markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# train-step ablation — {env['date']}, {env['cpu']}, {env['cores']} cores, load "
             f"{env['load_avg_start']:.2f} -> {env['load_avg_end']:.2f}", "",
             "| dtype | variant | step s | vs previous | vs plain | XLA temp | first loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['variant']} | {r['step_s']:.3f} | "
                     f"{_f(r['vs_previous'], '{:.2f}x')} | {r['vs_plain']:.2f}x | "
                     f"{_mib(r['xla_temp_bytes'])} | {r['loss_first']:.4f} |")
    return "\n".join(lines)


# ---- generation ----------------------------------------------------------------------------------

def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
    from .model import init_cache
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length))
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(shapes))


def make_recompute(cfg: ModelConfig):
    """What the original did: every new token runs the full forward over the whole current prefix
    (compiled once per prefix length; logits for the last position only; greedy)."""
    from .model import Decoder, head_matrix, logits_from_hidden

    @jax.jit
    def extend(params, tokens_BT):
        h = Decoder(cfg).apply({"params": params}, tokens_BT, return_hidden=True)
        logits = logits_from_hidden(h[:, -1:], head_matrix(cfg, params))[:, 0]
        return jnp.concatenate([tokens_BT, jnp.argmax(logits, -1)[:, None].astype(tokens_BT.dtype)], 1)

    def generate(params, prompts_BP, n):
        tokens = jnp.asarray(prompts_BP, jnp.int32)
        for _ in range(n):
            tokens = extend(params, tokens)
        return np.asarray(tokens)[:, prompts_BP.shape[1]:]
    return generate


def hf_gpt2_and_params(cfg: ModelConfig, seed: int = 0):
    """A randomly initialised HF GPT2LMHeadModel and the same weights as this project's params."""
    import torch
    import transformers
    from .convert import Source, convert_gpt2
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.hidden, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=True, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    tensors = {k[len("transformer."):] if k.startswith("transformer.") else k: v.detach().numpy()
               for k, v in model.state_dict().items()}
    source = Source("random HF GPT-2", "", None, hf_cfg.to_dict(), tensors, ["(in memory)"])
    with contextlib.redirect_stdout(io.StringIO()):
        params, _ = convert_gpt2(cfg, source)
    return model, params


def hf_generate(model, prompts_BP: np.ndarray, n: int) -> np.ndarray:
    import torch
    ids = torch.from_numpy(np.asarray(prompts_BP, np.int64))
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                             eos_token_id=None)
    return out[:, ids.shape[1]:].numpy()


# ---- the whole benchmark --------------------------------------------------------------------------

def run(s: BenchSettings, log: Callable[[str], None] = print) -> dict:
    res: dict = {"settings": dataclasses.asdict(s), "env": environment()}
    have_torch = False
    if s.torch:
        try:
            import torch
            torch.set_num_threads(cpu_count())
            res["env"]["torch_threads"] = torch.get_num_threads()
            have_torch = True
        except ImportError:
            res["notes"] = ["torch is not installed: the PyTorch rows are skipped."]
    res.setdefault("notes", [])
    log(f"# bench {s.name}: {res['env']['cpu']}, {res['env']['cores']} cores, load "
        f"{res['env']['load_avg_start']:.2f}")
    tmp = tempfile.mkdtemp(prefix="reflex_bench_")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, s.vocab_size, (s.batch, s.block_size + 1)).astype(np.int32)
    T = s.block_size
    res["train"] = {}
    res["peak"] = {}
    for dtype in (s.dtypes if s.train else ()):
        log(f"## train, {dtype}: building contenders")
        contenders: dict[str, Any] = {}
        for reflex in ("all", "none"):
            c = JaxTrain(s, reflex, dtype, tokens, os.path.join(tmp, f"{reflex}_{dtype}"))
            contenders[f"jax {reflex}"] = c
            log(f"  jax {reflex}: compiled in {c.compile_s:.1f} s")
        if have_torch:
            params = contenders["jax all"].init_params
            contenders["torch eager all"] = TorchTrain(contenders["jax all"].cfg, params, tokens,
                                                       dtype, compiled=False)
            if s.torch_compile:
                try:
                    c = TorchTrain(contenders["jax all"].cfg, params, tokens, dtype, compiled=True)
                    contenders["torch.compile all"] = c
                    log(f"  torch.compile all: compiled in {c.compile_s:.1f} s")
                except Exception as e:  # noqa: BLE001 - a missing compiler is a note, not a crash
                    res["notes"].append(f"torch.compile failed ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200]}); its rows are skipped.")
        fns = {name: c.step for name, c in contenders.items()}
        mm = {"jax": jax_matmul(s.peak_n, dtype)}
        if have_torch:
            mm["torch"] = torch_matmul(s.peak_n, dtype)
        for k, f in mm.items():
            fns[f"matmul {k}"] = (lambda f=f: [f() for _ in range(3)])
        log(f"## train, {dtype}: {s.train_reps} interleaved reps")
        times = interleaved(fns, s.train_reps, log, warmup_rounds=2)
        flop_mm = 2 * s.peak_n ** 3 * 3
        # the peak is the best rep (a peak; and the conservative choice for MFU on a noisy box)
        peak_rates = {k: flop_mm / min(times[f"matmul {k}"]) for k in mm}
        peak = max(peak_rates.values())
        res["peak"][dtype] = {"matmul_n": s.peak_n, **{f"{k}_flops": v for k, v in peak_rates.items()},
                              "peak_flops": peak, "source": max(peak_rates, key=peak_rates.get)}
        datasheet = None
        if jax.default_backend() != "cpu":  # accelerators: MFU is quoted against the datasheet
            value, where = flops.device_peak(jnp.dtype(dtype))
            if "datasheet" in where:
                datasheet = value * jax.device_count()
                res["peak"][dtype]["datasheet_flops"] = datasheet
        for name, c in contenders.items():
            t_step = median(times[name])
            tok_s = s.batch * T / t_step
            fpt = flops.train_flops_per_token(c.cfg, T)
            fpt_causal = 6 * flops.matmul_params(c.cfg) + flops.attention_flops_per_token(c.cfg, T) // 2
            _, rss = rss_peak_during(c.step)
            row = {"kind": c.kind, "reflex": c.reflex, "dtype": dtype, "step_s": t_step,
                   "step_s_all": times[name], "tokens_per_s": tok_s,
                   "flops_per_token": fpt, "mfu": tok_s * fpt / peak,
                   "mfu_causal_attention": tok_s * fpt_causal / peak,
                   "mfu_datasheet": tok_s * fpt / datasheet if datasheet else None,
                   "rss_peak_step_bytes": rss, "compile_s": c.compile_s,
                   "loss_first": c.losses[0], "loss_last": c.losses[-1]}
            if c.kind == "jax":
                row["xla_memory"] = c.memory
            else:
                row["optimizer"] = c.opt_impl
            res["train"][f"{name} {dtype}"] = row
        # same weights and batch: the first losses must agree (architecture parity)
        first = {n: c.losses[0] for n, c in contenders.items() if c.reflex == "all"}
        res["train"][f"parity {dtype}"] = {"first_losses": first,
                                           "max_abs_diff": max(first.values()) - min(first.values())}
        del contenders, fns
    res["train_parity"] = {d: res["train"].pop(f"parity {d}") for d in s.dtypes if s.train}
    if s.gen:
        res["generation"] = run_generation(s, tmp, log, have_torch and s.hf)
    res["kv_cache"] = kv_cache_report(s)
    res["ratios"] = ratios(res, s)
    res["env"]["load_avg_end"] = os.getloadavg()[0]
    return res


def gen_config(s: BenchSettings, reflex: str, **over) -> ModelConfig:
    block = max(s.gen_prompts) + s.gen_new_tokens
    fields = s.model_fields(reflex, "float32", block_size=block)
    fields.update(over)
    return ModelConfig(**fields)


def run_generation(s: BenchSettings, tmp: str, log, with_hf: bool) -> dict:
    from .model import init_params
    from .sampling import Generator
    out: dict = {"rows": [], "new_tokens": s.gen_new_tokens,
                 "recompute_tokens": s.gen_recompute_tokens, "dtype": "float32"}
    rng = np.random.default_rng(1)
    N, K = s.gen_new_tokens, s.gen_recompute_tokens
    cfg = gen_config(s, "all")
    params = init_params(cfg, jax.random.PRNGKey(0))
    gen, recompute = Generator(cfg), make_recompute(cfg)
    vcfg = gen_config(s, "none", norm="layernorm", mlp="gelu")
    hf_model = vparams = None
    if with_hf:
        try:
            hf_model, vparams = hf_gpt2_and_params(vcfg)
        except Exception as e:  # noqa: BLE001
            out["hf_note"] = f"HF GPT-2 skipped: {type(e).__name__}: {str(e)[:200]}"
    vgen = Generator(vcfg)
    for P in s.gen_prompts:
        for B in s.gen_batches:
            prompts = rng.integers(0, s.vocab_size, (B, P)).astype(np.int32)
            plist = prompts.tolist()
            fns = {"cached": lambda: gen.generate(params, plist, max_new_tokens=N),
                   "recompute": lambda: recompute(params, prompts, K)}
            # both compile here; greedy tokens must agree where both produced them
            same = np.array_equal(np.asarray(fns["cached"]())[:, :K], fns["recompute"]())
            if hf_model is not None:
                fns["vanilla cached"] = lambda: vgen.generate(vparams, plist, max_new_tokens=N)
                fns["hf generate"] = lambda: hf_generate(hf_model, prompts, N)
                ours, theirs = np.asarray(fns["vanilla cached"]()), fns["hf generate"]()
                hf_agree = float(np.mean(ours == theirs))
            log(f"## generation prompt {P} batch {B}")
            times = interleaved(fns, s.gen_reps, log)
            row = {"prompt": P, "batch": B, "cached_tok_s": B * N / median(times["cached"]),
                   "recompute_tok_s": B * K / median(times["recompute"]),
                   "greedy_same_tokens": bool(same)}
            row["cached_vs_recompute"] = row["cached_tok_s"] / row["recompute_tok_s"]
            if hf_model is not None:
                row["vanilla_cached_tok_s"] = B * N / median(times["vanilla cached"])
                row["hf_tok_s"] = B * N / median(times["hf generate"])
                row["ours_vs_hf"] = row["vanilla_cached_tok_s"] / row["hf_tok_s"]
                row["hf_greedy_token_agreement"] = hf_agree
            out["rows"].append(row)
    return out


def kv_cache_report(s: BenchSettings) -> dict:
    rows = {}
    for reflex in ("all", "none"):
        cfg = ModelConfig(**s.model_fields(reflex, "float32"))
        rows[reflex] = {"bytes": kv_cache_bytes(cfg, s.batch, s.block_size),
                        "kv_heads": cfg.kv_heads_total, "schedule": cfg.schedule_table()}
    cfg = ModelConfig(**s.model_fields("all", "float32"))
    expected = fractions.Fraction(cfg.kv_heads_total, cfg.n_layer * cfg.n_head)
    got = fractions.Fraction(rows["all"]["bytes"], rows["none"]["bytes"])
    return {"batch": s.batch, "length": s.block_size, "dtype": "float32", **rows,
            "ratio": float(got), "expected_ratio": f"{expected.numerator}/{expected.denominator}",
            "exact": got == expected}


def ratios(res: dict, s: BenchSettings) -> dict:
    tr, d0 = res["train"], s.dtypes[0]
    r: dict = {"headline_dtype": d0}

    def tok(name, d):
        row = tr.get(f"{name} {d}")
        return row["tokens_per_s"] if row else None

    def ratio(a, b):
        return a / b if a and b else None

    for d in (s.dtypes if tr else ()):
        suffix = "" if d == d0 else f"_{d}"
        r[f"train_vs_torch_compile{suffix}"] = ratio(tok("jax all", d), tok("torch.compile all", d))
        r[f"train_vs_torch_eager{suffix}"] = ratio(tok("jax all", d), tok("torch eager all", d))
        r[f"reflex_vs_vanilla_step_time{suffix}"] = ratio(tr[f"jax all {d}"]["step_s"],
                                                          tr[f"jax none {d}"]["step_s"])
        r[f"mfu{suffix}"] = tr[f"jax all {d}"]["mfu"]
        if tr[f"jax all {d}"].get("mfu_datasheet"):
            r[f"mfu_datasheet{suffix}"] = tr[f"jax all {d}"]["mfu_datasheet"]
    torch_best = max([tok(n, d) or 0 for n in ("torch.compile all", "torch eager all")
                      for d in s.dtypes], default=0)
    jax_best = max([tok("jax all", d) or 0 for d in s.dtypes], default=0)
    r["train_best_vs_torch_best"] = ratio(jax_best, torch_best)
    gen = res.get("generation")
    if gen:
        at = [row for row in gen["rows"] if row["prompt"] == 512] or \
             [row for row in gen["rows"] if row["prompt"] == max(x["prompt"] for x in gen["rows"])]
        r["decode_prompt"] = at[0]["prompt"]
        r["decode_cached_vs_recompute_512"] = min(row["cached_vs_recompute"] for row in at)
        hf = [row["ours_vs_hf"] for row in gen["rows"] if "ours_vs_hf" in row]
        r["generate_vs_hf_min"] = min(hf) if hf else None
    else:
        r["decode_cached_vs_recompute_512"] = None
    r["kv_bytes_reflex_vs_vanilla"] = res["kv_cache"]["ratio"]
    r["kv_bytes_exact"] = res["kv_cache"]["exact"]
    return r


# ---- report ---------------------------------------------------------------------------------------

def _mib(n) -> str:
    return "–" if n is None or n < 0 else f"{n / 2 ** 20:,.0f} MiB"


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(res: dict) -> str:
    s, env, r = res["settings"], res["env"], res["ratios"]
    lines = [f"# bench.py ({s['name']}) — {env['date']}",
             f"{env['cpu']}, {env['cores']} cores, load avg {env['load_avg_start']:.2f} -> "
             f"{env.get('load_avg_end', float('nan')):.2f}; jax {env['jax']} ({env['backend']}), "
             f"torch {env.get('torch')} ({env.get('torch_threads')} threads); "
             f"XLA_FLAGS={env['xla_flags'] or '(none)'}; GLIBC_TUNABLES="
             f"{env.get('glibc_tunables') or '(none)'} (THP {env.get('thp')})", "",
             f"Model: vocab {s['vocab_size']}, {s['n_layer']} layers x {s['n_head']} heads, n_embd "
             f"{s['n_embd']}, block {s['block_size']}, batch {s['batch']} (pre-RMSNorm, SwiGLU, "
             "learned positions, tied head, bias); AdamW + clip 1.0; same initial weights on all "
             f"sides; median of {s['train_reps']} interleaved reps.",
             "MFU = tokens/s x (6 N + 12 L H D T) / measured matmul peak of the same dtype (best rep "
             "of JAX and PyTorch; N = matmul params, reflex-aware; attention counted over the full "
             "T x T, see flops.py).",
             "", "| peak | JAX GFLOP/s | PyTorch GFLOP/s | peak used |", "|---|---:|---:|---:|"]
    for d, p in res["peak"].items():
        lines.append(f"| {d} {p['matmul_n']}^3 matmul | {_f(p.get('jax_flops', 0) / 1e9, '{:.1f}')} | "
                     f"{_f(p.get('torch_flops', 0) / 1e9 if p.get('torch_flops') else None, '{:.1f}')}"
                     f" | {p['peak_flops'] / 1e9:.1f} |")
    lines += ["", "| train step | dtype | step s | tokens/s | MFU | peak step memory | first loss |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in res["train"].items():
        mem = row.get("xla_memory")
        memtxt = (f"XLA temp {_mib(mem['temp_bytes'])} + args {_mib(mem['argument_bytes'])}; "
                  if mem else "") + f"RSS +{_mib(row['rss_peak_step_bytes'])}"
        label = f"{row['kind']} `{row['reflex']}`"
        lines.append(f"| {label} | {row['dtype']} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['mfu'] * 100:.1f}% | {memtxt} | {row['loss_first']:.4f} |")
    gen = res.get("generation")
    if gen:
        lines += ["", f"Generation (float32, greedy, {gen['new_tokens']} new tokens per call incl. "
                  f"prefill; prefix re-run timed over {gen['recompute_tokens']} tokens, each a full "
                  "forward over the current prefix, as the original did):", "",
                  "| prompt | batch | cached tok/s | re-run tok/s | cached/re-run | vanilla cached "
                  "tok/s | HF generate tok/s | ours/HF |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in gen["rows"]:
            lines.append(f"| {row['prompt']} | {row['batch']} | {row['cached_tok_s']:.1f} | "
                         f"{row['recompute_tok_s']:.2f} | {row['cached_vs_recompute']:.1f}x | "
                         f"{_f(row.get('vanilla_cached_tok_s'), '{:.1f}')} | "
                         f"{_f(row.get('hf_tok_s'), '{:.1f}')} | {_f(row.get('ours_vs_hf'), '{:.2f}x')} |")
        if gen.get("hf_note"):
            lines.append(gen["hf_note"])
    kv = res["kv_cache"]
    lines += ["", f"KV cache (batch {kv['batch']}, {kv['length']} slots, float32): `all` "
              f"{_mib(kv['all']['bytes'])} ({kv['all']['kv_heads']} K/V heads) vs `none` "
              f"{_mib(kv['none']['bytes'])} ({kv['none']['kv_heads']}): ratio {kv['ratio']:.4f} = "
              f"{kv['expected_ratio']} exactly: {kv['exact']}", "", "| ratio | value |", "|---|---:|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v if isinstance(v, (str, bool)) or v is None else f'{v:.3f}'} |")
    for note in res.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def write_json(res: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
