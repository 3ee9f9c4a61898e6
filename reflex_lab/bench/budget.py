"""The step-time budget (`bench.py --profile`): one train step's time split into categories, from
the XLA profile of this project's step and the PyTorch profiler of its peer.

Categories: matmuls by site (q/k/v/o projections, MLP, LM head + loss), the attention core, norms
and elementwise, the optimizer update, the embedding gradient, copies/transposes, other, and the
part of the wall time no op accounts for (dispatch, waits). Each has its seconds per step and,
where it does matmuls, the GFLOP/s it reached; elementwise categories get GB/s.
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Callable, Optional

from .hlo_ops import HloOp, parse_hlo

CATEGORIES = ("matmul q/k/v/o", "matmul MLP", "matmul LM head + loss", "attention core",
              "norms and elementwise", "optimizer update", "embedding gradient",
              "copies/transposes", "other")
UNACCOUNTED = "not in any op (dispatch, waits; < 0: ops overlapped)"
# thunks whose profile event spans the ops they run: counting them would count those ops twice
_CONTAINERS = ("while", "conditional", "call")
_PROJ = re.compile(r"/attn/[qkvo]/")


def _site(op_name: str) -> Optional[str]:
    """The category a name stack places an op in, or None where the name does not say."""
    if "optimizer" in op_name:
        return "optimizer update"
    if "lm_head_loss" in op_name:
        return "matmul LM head + loss"
    if _PROJ.search(op_name):
        return "matmul q/k/v/o"
    if "/attn/" in op_name:
        return "attention core"
    if "/mlp/" in op_name:
        return "matmul MLP"
    if re.search(r"/ln_(\d|f)/", op_name):
        return "norms and elementwise"
    return None


def xla_category(op: HloOp) -> str:
    """The budget category of one compiled op: matmuls by the site their name stack gives, the
    zero-FLOP ops of a matmul site (bias adds, SiLU, the gate product) as elementwise, copies
    and transposes by opcode or fusion name, scatters/gathers outside any site as the embedding."""
    site = _site(op.op_name)
    if site == "optimizer update":
        return site
    if op.flops:
        return site if site and site != "norms and elementwise" else "other"
    if op.opcode in ("copy", "transpose", "copy-start", "copy-done") or (
            op.opcode == "fusion" and ("copy" in op.name or "transpose" in op.name)):
        return "copies/transposes"
    if site is None and (op.opcode in ("scatter", "gather") or "scatter" in op.name):
        return "embedding gradient"
    if site in ("matmul q/k/v/o", "matmul MLP"):
        return "norms and elementwise"
    return site or "other"


def xla_op_seconds(step: Callable[[], object], reps: int = 1) -> tuple[dict, dict]:
    """({hlo op: seconds per step}, {hlo op: executions per step}) from a jax.profiler trace of
    `reps` calls of `step`."""
    import jax
    out: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, float] = collections.defaultdict(float)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(reps):
            step()
        jax.profiler.stop_trace()
        path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    name = dict(event.stats).get("hlo_op")
                    if name:
                        out[name] += event.duration_ns * 1e-9 / reps
                        calls[name] += 1 / reps
    return dict(out), dict(calls)


def _rows(seconds: dict, flops: dict, nbytes: dict, wall_s: float) -> list[dict]:
    rows = []
    for cat in CATEGORIES:
        s = seconds.get(cat, 0.0)
        row = {"category": cat, "seconds": s, "share": s / wall_s if wall_s else None,
               "gflop": flops.get(cat, 0) / 1e9, "gb": nbytes.get(cat, 0) / 1e9}
        row["gflop_per_s"] = row["gflop"] / s if s and row["gflop"] else None
        row["gb_per_s"] = row["gb"] / s if s and not row["gflop"] else None
        rows.append(row)
    rest = wall_s - sum(seconds.values())
    rows.append({"category": UNACCOUNTED, "seconds": rest, "share": rest / wall_s,
                 "gflop": 0.0, "gb": 0.0, "gflop_per_s": None, "gb_per_s": None})
    return rows


def xla_budget(compiled, step: Callable[[], object], wall_s: float, reps: int = 2) -> dict:
    """The budget of a compiled JAX step (`compiled.as_text()` names its ops), `wall_s` its
    measured median time."""
    ops = parse_hlo(compiled.as_text())
    op_s, calls = xla_op_seconds(step, reps)
    seconds, flops, nbytes = (collections.defaultdict(float) for _ in range(3))
    top = []
    for name, s in op_s.items():
        op = ops.get(name)
        if op is not None and op.opcode in _CONTAINERS:
            continue
        cat = xla_category(op) if op else "other"
        seconds[cat] += s
        if op:
            flops[cat] += op.flops * calls[name]
            nbytes[cat] += op.bytes * calls[name]
        top.append((s, name, cat, op.op_name if op else ""))
    top.sort(reverse=True)
    return {"rows": _rows(seconds, flops, nbytes, wall_s), "wall_s": wall_s,
            "ops_s": sum(seconds.values()), "n_ops": sum(calls.values()),
            "top_ops": [{"op": n, "category": c, "seconds": s, "op_name": o[-120:]}
                        for s, n, c, o in top[:15]]}


# ---- PyTorch -----------------------------------------------------------------------------------

_TORCH_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def weight_sites(cfg) -> dict[frozenset, str]:
    """{(out, in) dims of each weight matrix: its matmul site} for the peer's model."""
    E, D, V, F = cfg.n_embd, cfg.head_dim, cfg.vocab_size, cfg.hidden
    sites = {frozenset((E, (cfg.n_head + 2 * p.n_self) * D)): "matmul q/k/v/o" for p in cfg.layers}
    sites[frozenset((E, cfg.n_head * D))] = "matmul q/k/v/o"
    sites[frozenset((E, F))] = "matmul MLP"
    sites[frozenset((E, V))] = "matmul LM head + loss"
    return sites


def _mm_dims(name: str, shapes) -> Optional[tuple[int, int, int]]:
    """(a, b, c) of the profiled [a, b] x [b, c] product (bmm: batch folded into a), or None."""
    shapes = [tuple(x) for x in shapes or () if x]
    mats = shapes[1:3] if name == "aten::addmm" else shapes[:2]
    if len(mats) < 2 or len(mats[0]) != len(mats[1]) or len(mats[0]) not in (2, 3):
        return None
    (*batch, a, b), (*_, _, c) = mats
    return (a * (batch[0] if batch else 1), b, c)


def torch_op(name: str, shapes, tokens: int, sites: dict) -> tuple[str, int]:
    """(category, FLOPs) of one profiled PyTorch op. A matmul's site is its weight, found from
    the product's shape: a weight gradient contracts over the tokens ([out, M] x [M, in]), the
    forward and input-gradient products contract over a weight dimension."""
    n = name.lower()
    if name in _TORCH_MATMUL:
        dims = _mm_dims(name, shapes)
        if dims is None:
            return "matmul q/k/v/o", 0
        a, b, c = dims
        weight = frozenset((a, c)) if b == tokens else frozenset((b, c))
        return sites.get(weight, "attention core" if name.endswith("bmm") else "other"), 2 * a * b * c
    if "attention" in n or "sdpa" in n:
        return "attention core", 0
    if "adam" in n or "_foreach" in n or "clip_grad" in n:
        return "optimizer update", 0
    if "embedding" in n or "index_add" in n or "index_put" in n:
        return "embedding gradient", 0
    if "cross_entropy" in n or "log_softmax" in n or "nll_loss" in n:
        return "matmul LM head + loss", 0
    if any(k in n for k in ("copy_", "clone", "contiguous", "transpose", "permute", "aten::t",
                            "aten::cat", "_to_copy", "aten::to")):
        return "copies/transposes", 0
    if n.startswith("aten::") or "cpp_fused" in n:
        return "norms and elementwise", 0
    return "other", 0


def torch_budget(step: Callable[[], object], wall_s: float, cfg, tokens: int,
                 reps: int = 2) -> dict:
    """The same budget for a PyTorch step, from torch.profiler's self CPU times (which do not
    count a parent op's children twice)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(reps):
            step()
    seconds, flops = collections.defaultdict(float), collections.defaultdict(float)
    sites, top = weight_sites(cfg), []
    for ev in prof.key_averages(group_by_input_shape=True):
        s = ev.self_cpu_time_total * 1e-6 / reps
        if s <= 0:
            continue
        cat, op_flops = torch_op(ev.key, ev.input_shapes, tokens, sites)
        seconds[cat] += s
        flops[cat] += op_flops * ev.count / reps
        top.append((s, ev.key, cat))
    top.sort(reverse=True)
    return {"rows": _rows(seconds, flops, {}, wall_s), "wall_s": wall_s,
            "ops_s": sum(seconds.values()),
            "top_ops": [{"op": n, "category": c, "seconds": s} for s, n, c in top[:15]]}
