"""The numbers the benchmark reports: the KV-cache comparison, the headline ratios, the markdown
tables and the JSON file."""
from __future__ import annotations

import fractions
import json
import os

from reflex_jax.model import ModelConfig, kv_cache_bytes

from .settings import BenchSettings
from .stats import fmt_ratio, paired_ratio
from .timing import steady_pairs


def kv_cache_report(s: BenchSettings) -> dict:
    """KV-cache bytes of the `all` and `none` schedules; their ratio must be exactly the share of
    K/V heads the reflex schedule keeps."""
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


def _ratio(a, b):
    return a / b if a and b else None


# ratio key -> (numerator, denominator) contenders of a step-time ratio; a tokens/s ratio of
# two contenders on the same batch is the inverse step-time ratio, so "ours vs torch" is
# torch's time over ours
STEP_RATIOS = {"train_vs_torch_compile": ("torch.compile all", "jax all"),
               "train_vs_torch_eager": ("torch eager all", "jax all"),
               "reflex_vs_vanilla_step_time": ("jax all", "jax none"),
               "document_mask_step_time": ("jax all docs", "jax all")}


def paired_step_ratio(a: dict, b: dict) -> dict:
    """stats.paired_ratio of two train rows' step times, without the rounds where either grew
    the heap."""
    return paired_ratio(a["step_s_all"], b["step_s_all"],
                        steady_pairs(a.get("heap_growth_all"), b.get("heap_growth_all")))


def _train_ratios(tr: dict, s: BenchSettings) -> dict:
    """Every ratio of two contenders with its 95% interval (`<key>_ci95`) from the paired,
    interleaved reps (stats.py)."""
    d0, r = s.dtypes[0], {}

    def tok(name, d):
        row = tr.get(f"{name} {d}")
        return row["tokens_per_s"] if row else None

    for d in (s.dtypes if tr else ()):
        suffix = "" if d == d0 else f"_{d}"
        for key, (num, den) in STEP_RATIOS.items():
            a, b = tr.get(f"{num} {d}"), tr.get(f"{den} {d}")
            if a is None or b is None:
                if key != "document_mask_step_time":
                    r[f"{key}{suffix}"] = r[f"{key}{suffix}_ci95"] = None
                continue
            paired = paired_step_ratio(a, b)
            r[f"{key}{suffix}"], r[f"{key}{suffix}_ci95"] = paired["ratio"], paired["ci95"]
        r[f"mfu{suffix}"] = tr[f"jax all {d}"]["mfu"]
        if tr[f"jax all {d}"].get("mfu_datasheet"):
            r[f"mfu_datasheet{suffix}"] = tr[f"jax all {d}"]["mfu_datasheet"]
    torch_best = max([tok(n, d) or 0 for n in ("torch.compile all", "torch eager all")
                      for d in s.dtypes], default=0)
    jax_best = max([tok("jax all", d) or 0 for d in s.dtypes], default=0)
    r["train_best_vs_torch_best"] = _ratio(jax_best, torch_best)
    return r


def _generation_ratios(gen: dict | None) -> dict:
    if not gen:
        return {"decode_cached_vs_recompute_512": None}
    at = [row for row in gen["rows"] if row["prompt"] == 512] or \
         [row for row in gen["rows"] if row["prompt"] == max(x["prompt"] for x in gen["rows"])]
    hf = [row["ours_vs_hf"] for row in gen["rows"] if "ours_vs_hf" in row]
    return {"decode_prompt": at[0]["prompt"],
            "decode_cached_vs_recompute_512": min(row["cached_vs_recompute"] for row in at),
            "generate_vs_hf_min": min(hf) if hf else None}


def ratios(res: dict, s: BenchSettings) -> dict:
    """The headline numbers (top-level `ratios` of the JSON); unsuffixed = the first dtype."""
    r: dict = {"headline_dtype": s.dtypes[0]}
    r.update(_train_ratios(res["train"], s))
    r.update(_generation_ratios(res.get("generation")))
    r["kv_bytes_reflex_vs_vanilla"] = res["kv_cache"]["ratio"]
    r["kv_bytes_exact"] = res["kv_cache"]["exact"]
    return r


# ---- markdown -------------------------------------------------------------------------------------

def mib(n) -> str:
    return "–" if n is None or n < 0 else f"{n / 2 ** 20:,.0f} MiB"


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _header(s: dict, env: dict) -> list[str]:
    return [f"# bench.py ({s['name']}) — {env['date']}",
            f"{env['cpu']}{' (' + env['cpu_generation'] + ')' if env.get('cpu_generation') else ''} "
            f"({' '.join(env.get('cpu_flags', [])) or 'flags unknown'}), "
            f"{env['cores']} cores, load avg {env['load_avg_start']:.2f} -> "
            f"{env.get('load_avg_end', float('nan')):.2f}; jax {env['jax']} ({env['backend']}), "
            f"torch {env.get('torch')} ({env.get('torch_threads')} threads); "
            f"XLA_FLAGS={env['xla_flags'] or '(none)'}; GLIBC_TUNABLES="
            f"{env.get('glibc_tunables') or '(none)'} (THP {env.get('thp')})", "",
            f"Model: vocab {s['vocab_size']}, {s['n_layer']} layers x {s['n_head']} heads, n_embd "
            f"{s['n_embd']}, block {s['block_size']}, batch {s['batch']} (pre-RMSNorm, SwiGLU, "
            "learned positions, tied head, bias); AdamW + clip 1.0; same initial weights on all "
            f"sides; step times: median of {s['train_reps']} interleaved reps; ratios: 20% trimmed "
            "mean of the log per-round ratios, with Yuen's 95% interval (reflex_lab/bench/stats.py); reps "
            "that grew the process's heap by more than 128 MiB are left out of both.",
            "MFU = tokens/s x (6 N + 12 L H D T) / measured matmul peak of the same dtype (best rep "
            "of JAX and PyTorch; N = matmul params, reflex-aware; attention counted over the full "
            "T x T, see reflex_jax/train/flops.py)."]


def _train_tables(res: dict) -> list[str]:
    lines = ["", "| peak | JAX GFLOP/s | PyTorch GFLOP/s | peak used |", "|---|---:|---:|---:|"]
    for d, p in res["peak"].items():
        lines.append(f"| {d} {p['matmul_n']}^3 matmul | {_f(p.get('jax_flops', 0) / 1e9, '{:.1f}')} | "
                     f"{_f(p.get('torch_flops', 0) / 1e9 if p.get('torch_flops') else None, '{:.1f}')}"
                     f" | {p['peak_flops'] / 1e9:.1f} |")
    lines += ["", "| train step | dtype | step s | tokens/s | MFU | peak step memory | first loss |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in res["train"].values():
        mem = row.get("xla_memory")
        memtxt = (f"XLA temp {mib(mem['temp_bytes'])} + args {mib(mem['argument_bytes'])}; "
                  if mem else "") + f"RSS +{mib(row['rss_peak_step_bytes'])}"
        label = f"{row['kind']} `{row['reflex']}`" + (", documents" if row.get("document_mask") else "")
        lines.append(f"| {label} | {row['dtype']} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['mfu'] * 100:.1f}% | {memtxt} | {row['loss_first']:.4f} |")
    return lines


def _generation_table(gen: dict) -> list[str]:
    lines = ["", f"Generation (float32, greedy, {gen['new_tokens']} new tokens per call incl. "
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
    return lines


def _kv_and_ratios(kv: dict, r: dict) -> list[str]:
    lines = ["", f"KV cache (batch {kv['batch']}, {kv['length']} slots, float32): `all` "
             f"{mib(kv['all']['bytes'])} ({kv['all']['kv_heads']} K/V heads) vs `none` "
             f"{mib(kv['none']['bytes'])} ({kv['none']['kv_heads']}): ratio {kv['ratio']:.4f} = "
             f"{kv['expected_ratio']} exactly: {kv['exact']}", "", "| ratio | value |", "|---|---:|"]
    lines[-2:] = ["| ratio | value [95% interval] |", "|---|---:|"]
    for k, v in r.items():
        if k.endswith("_ci95"):
            continue
        if f"{k}_ci95" in r:
            text = fmt_ratio({"ratio": v, "ci95": r[f"{k}_ci95"]})
        else:
            text = v if isinstance(v, (str, bool)) or v is None else f"{v:.3f}"
        lines.append(f"| {k} | {text} |")
    return lines


def markdown(res: dict) -> str:
    """The whole benchmark result as markdown (what bench.py prints)."""
    lines = _header(res["settings"], res["env"]) + _train_tables(res)
    if res.get("generation"):
        lines += _generation_table(res["generation"])
    lines += _kv_and_ratios(res["kv_cache"], res["ratios"])
    for note in res.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def ablation_markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# train-step ablation — {env['date']}, {env['cpu']}, {env['cores']} cores, load "
             f"{env['load_avg_start']:.2f} -> {env['load_avg_end']:.2f}", "",
             "| dtype | variant | step s | speed-up vs previous [95%] | vs plain [95%] | XLA temp | "
             "first loss |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['variant']} | {r['step_s']:.3f} | "
                     f"{fmt_ratio(r['vs_previous'], 2)} | {fmt_ratio(r['vs_plain'], 2)} | "
                     f"{mib(r['xla_temp_bytes'])} | {r['loss_first']:.4f} |")
    return "\n".join(lines)


def write_json(res: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
