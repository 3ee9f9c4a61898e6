"""results.json and results.md of a grid: the shared setup, the variants, one table row per group
(mean ± sample std over seeds) and one per run, and the plots. The held-out metrics beyond the val
loss (bits per byte, answer-only loss, exact match by recall distance) get columns when a run
logged them."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from ml_collections import ConfigDict
from reflex_jax.run_config import flatten_config

from .grid import Run
from .plots import plot_curves, plot_group_summaries
from .runs import now_utc
from .stats import distance_keys, model_facts


def fmt_stat(stat: Optional[dict], digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """'2.100 ± 0.200' from a mean_std dict; '—' when there is no value."""
    if not stat or stat.get("mean") is None:
        return "—"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(stat["mean"] * scale)
    if stat.get("std") is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def fmt_int(n: Optional[float]) -> str:
    return "—" if n is None else f"{int(round(n)):,}"


def eval_columns(items: Sequence[dict], has_value) -> list[tuple[str, str, bool]]:
    """(header, summary key, is a rate) of each held-out metric beyond the val loss that at least
    one of `items` (group or run summaries) has a value of, per `has_value(item, key)`."""
    keys = [("final val bpb", "final_val_bpb", False),
            ("final answer loss", "final_val_answer_loss", False)]
    keys += [(f"final EM d{k[len('final_exact_match_d'):]}", k, True)
             for k in distance_keys(items, "final_")]
    return [c for c in keys if any(has_value(item, c[1]) for item in items)]


def _group_has(g: dict, key: str) -> bool:
    return bool(g.get(key, {}).get("n"))


def _run_has(r: dict, key: str) -> bool:
    return r.get(key) is not None


def _group_cell(g: dict, key: str, rate: bool) -> str:
    stat = g.get(key)
    if rate:
        return fmt_stat(stat, 1, 100.0) + ("%" if stat and stat["n"] else "")
    return fmt_stat(stat)


def _run_cell(r: dict, key: str, rate: bool) -> str:
    v = r.get(key)
    if v is None:
        return "—"
    return f"{100 * v:.1f}%" if rate else f"{v:.4f}"


def _task_option_text(c: ConfigDict) -> str:
    from reflex_jax.data import get_task
    known = get_task(c.data.task).defaults
    return ", ".join(f"{k}={c.data.task_options[k]}" for k in known if k in c.data.task_options)


def setup_facts(config: ConfigDict) -> dict:
    """What every run of the grid shares, in words: model, data, steps and tokens, optimizer, eval."""
    c = config
    tokens_per_step = int(c.batch_size) * int(c.model.block_size)
    data = (f"built-in task `{c.data.task}` ({_task_option_text(c)}, {c.data.tokenizer} tokenizer, "
            f"{c.data.task_rows} train rows, {c.data.task_val_rows} val rows)") if c.data.task else \
        f"prepared directory `{c.data.dir}`"
    data += ("; packed windows, each document (row or file) seeing only itself"
             if c.data.get("document_mask", False) else "; packed windows, documents seeing earlier ones")
    m = c.model
    return {"data": data, "loss_on": c.data.loss_on,
            "model": f"{m.n_layer} layers x {m.n_head} heads, n_embd {m.n_embd}, block {m.block_size}, "
                     f"vocab {m.vocab_size}, {m.norm}, {m.mlp}, {m.pos_emb} positions, dropout {m.dropout}, "
                     f"{m.dtype}",
            "steps": int(c.max_steps), "batch_size": int(c.batch_size), "grad_accum": int(c.grad_accum),
            "tokens_per_step": tokens_per_step, "tokens_per_run": tokens_per_step * int(c.max_steps),
            "optimizer": f"AdamW lr {c.optim.lr:g} -> {c.optim.min_lr:g} (warmup {c.optim.warmup_steps}, "
                         f"cosine), betas {c.optim.b1:g}/{c.optim.b2:g}, wd {c.optim.weight_decay:g}, "
                         f"clip {c.optim.clip:g}",
            "eval": f"every {c.eval_interval} steps on {c.eval_batches} val batches"
                    + (f", exact match on {c.eval_exact_match} held-out questions"
                       if c.data.task and c.eval_exact_match else ""),
            "init_from": c.init_from or None}


def variant_differences(runs: Sequence[Run]) -> dict:
    """{variant: {field: value}} for the config fields in which the variants differ from each other
    (schedule, seed and run_dir aside)."""
    first: dict[str, dict] = {}
    for run in runs:
        if run.variant and run.variant not in first:
            first[run.variant] = flatten_config(run.config.to_dict())
    skip = {"run_dir", "seed", "model.head_plan", "model.reflex"}
    keys = sorted({k for flat in first.values() for k in flat if k not in skip
                   and len({json.dumps(f.get(k), default=str) for f in first.values()}) > 1})
    return {name: {k: flat.get(k) for k in keys} for name, flat in first.items()}


def write_report(out_dir: str, runs: Sequence[Run], summaries: Sequence[dict], groups: Sequence[dict],
                 *, command: str = "", title: str = "", outcome: Optional[dict] = None) -> dict:
    """results.json, results.md and the plots in `out_dir`; returns the results dict."""
    os.makedirs(out_dir, exist_ok=True)
    facts = {}
    for run in runs:  # per group: params and KV bytes of its model (same for every seed)
        if run.group not in facts:
            facts[run.group] = model_facts(run.config)
    for g in groups:
        g.update(facts[g["group"]])
    setup = setup_facts(runs[0].config)
    variants = variant_differences(runs)
    if any("init_from" in diff for diff in variants.values()):
        setup["init_from"] = None  # per variant, listed with the variants
    plots = plot_curves(out_dir, runs, summaries) + plot_group_summaries(out_dir, groups)
    results = {"title": title or os.path.basename(os.path.normpath(out_dir)), "created": now_utc(),
               "command": command, "setup": setup, "variants": variants, "groups": groups,
               "runs": list(summaries), "plots": plots, "outcome": outcome or {}}
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(results))
    return results


def _setup_lines(results: dict, baseline: Optional[str]) -> list[str]:
    s = results["setup"]
    lines = [f"# {results['title']}", "",
             f"Generated {results['created']} by `{results['command'] or 'reflex_lab.compare'}`.", "",
             f"* Model: {s['model']}", f"* Data: {s['data']}; loss on {s['loss_on']} tokens",
             f"* Training: {s['steps']} steps x {s['batch_size']} sequences x "
             f"{s['tokens_per_step'] // s['batch_size']} tokens = {s['tokens_per_run']:,} tokens "
             f"per run; {s['optimizer']}",
             f"* Evaluation: {s['eval']}"]
    if s.get("init_from"):
        lines.append(f"* Init from: `{s['init_from']}`")
    for name, diff in results.get("variants", {}).items():
        lines.append(f"* Variant `{name}`: " + (", ".join(f"`{k}={v!r}`" for k, v in diff.items()) or
                                                 "the shared config"))
    lines += ["", "Mean ± sample std over the finished seeds (one value: one seed). "
              + (f"Δ is the final val loss minus `{baseline}`'s, paired by seed (same data and batches). "
                 if baseline else "")
              + "tokens/s is the median training-only log interval of a run (shared 2-core machine: noisy)."
              + _eval_columns_note(results["groups"]), ""]
    return lines


def _eval_columns_note(groups: Sequence[dict]) -> str:
    """What the held-out metric columns of this report mean (empty when there are none)."""
    notes = {"final_val_bpb": "val bpb: bits per UTF-8 byte of the val loss's targets (tokenizer-"
                              "independent)",
             "final_val_answer_loss": "answer loss: val loss on answer tokens only"}
    said = [notes.get(key, "EM dk: exact match of the questions asking the pair said k pairs "
                           "before the question") for _, key, _ in eval_columns(groups, _group_has)]
    said = list(dict.fromkeys(said))  # one note for all distance columns
    return (" " + "; ".join(said) + ".") if said else ""


def _group_table(groups: Sequence[dict], baseline: Optional[str], has_em: bool) -> list[str]:
    head = ["group", "layout (self+cross heads per layer)", "seeds", "final val loss", "best val loss"]
    if baseline:
        head.append(f"Δ final vs {baseline}")
    if has_em:
        head += ["final exact match", "best exact match"]
    extra = eval_columns(groups, _group_has)
    head += [name for name, _, _ in extra]
    head += ["tokens/s", "params", "KV heads", "KV bytes/token", "train FLOPs/token", "wall/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for g in groups:
        layout = g["layout"].split(": ", 1)[-1].replace(" | ", " / ")  # '|' would split the cell
        seeds = f"{g['finished']}/{g['runs']}" + (f" ({', '.join(map(str, g['seeds']))})"
                                                  if g["seeds"] else "")
        row = [f"`{g['group']}`", layout, seeds, fmt_stat(g["final_val_loss"]),
               fmt_stat(g["best_val_loss"])]
        if baseline:
            row.append("(baseline)" if "delta_vs" not in g
                       else fmt_stat(g["delta_final_val_loss"], sign=True))
        if has_em:
            row += [fmt_stat(g["final_exact_match"], 1, 100.0) + ("%" if g["final_exact_match"]["n"] else ""),
                    fmt_stat(g["best_exact_match"], 1, 100.0) + ("%" if g["best_exact_match"]["n"] else "")]
        row += [_group_cell(g, key, rate) for _, key, rate in extra]
        wall = g["wall_s"]["mean"]
        row += [fmt_int(g["tokens_per_s"]["mean"]), fmt_int(g["params"]),
                f"{g['kv_heads']}/{g['kv_heads_vanilla']}",
                f"{g['kv_bytes_per_token']:,} ({g['kv_dtype']})", _flops_cell(g),
                "—" if wall is None else f"{wall:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _flops_cell(g: dict) -> str:
    f = g.get("train_flops_per_token")  # reports written before the column have none
    return "—" if f is None else f"{f / 1e6:.2f} M"


# metric: (name, digits, scale)
PAIRED_NAMES = {"final_val_loss": ("final val loss", 3, 1.0), "final_val_bpb": ("final val bpb", 3, 1.0),
                "final_val_answer_loss": ("final answer loss", 3, 1.0),
                "final_exact_match": ("final exact match, percentage points", 1, 100.0)}


def _paired_tables(groups: Sequence[dict], baseline: Optional[str]) -> list[str]:
    """Per metric, the paired-by-seed difference (group minus control) against the baseline and
    every control."""
    controls = list(dict.fromkeys([baseline] * bool(baseline)
                                  + [b for g in groups for b in g.get("paired", {})]))
    if len(controls) < 2:
        return []  # the Δ column of the group table says it all
    lines = ["## Paired differences", "",
             "Each cell: mean ± sample std over seeds of (row's final value − column's final value of "
             "the same seed); negative is lower (better for losses, worse for exact match).", ""]
    for metric, (name, digits, scale) in PAIRED_NAMES.items():
        if not any(d.get(metric, {}).get("n") for g in groups for d in g.get("paired", {}).values()):
            continue
        lines += [f"Δ {name}:", "",
                  "| group | " + " | ".join(f"vs `{c}`" for c in controls) + " |",
                  "|---|" + "---:|" * len(controls)]
        for g in groups:
            cells = ["—" if c == g["group"] else fmt_stat(g.get("paired", {}).get(c, {}).get(metric),
                                                           digits, scale, sign=True)
                     for c in controls]
            lines.append(f"| `{g['group']}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _run_table(runs: Sequence[dict], has_em: bool) -> list[str]:
    extra = eval_columns(runs, _run_has)
    lines = ["## Runs", "", "| run | seed | status | final val loss (step) | best val loss (step) |"
             + (" final exact match |" if has_em else "")
             + "".join(f" {name} |" for name, _, _ in extra) + " train loss | tokens/s | wall |",
             "|---|---:|---|---:|---:|" + ("---:|" if has_em else "") + "---:|" * len(extra)
             + "---:|---:|---:|"]
    for r in runs:
        fv = "—" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f} ({r['final_val_step']})"
        bv = "—" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f} ({r['best_val_step']})"
        status = r["status"] + (" (recorded)" if r.get("source") == "recorded" else "")
        row = [f"`{r['name']}`", str(r["seed"]), status, fv, bv]
        if has_em:
            row.append("—" if r["final_exact_match"] is None else f"{100 * r['final_exact_match']:.1f}%")
        row += [_run_cell(r, key, rate) for _, key, rate in extra]
        row += ["—" if r["final_loss"] is None else f"{r['final_loss']:.4f}", fmt_int(r["tokens_per_s"]),
                "—" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(results: dict) -> str:
    groups = results["groups"]
    has_em = any(g["final_exact_match"]["n"] for g in groups)
    baseline = next((g["delta_vs"] for g in groups if "delta_vs" in g), None)
    lines = _setup_lines(results, baseline) + _group_table(groups, baseline, has_em) + [""]
    lines += _paired_tables(groups, baseline)
    lines += _run_table(results["runs"], has_em)
    missing = [r for r in results["runs"] if r["status"] != "finished"]
    if missing:
        lines += ["", f"{len(missing)} run(s) did not finish and are left out of the means: "
                  + ", ".join(f"`{r['name']}` ({r['status']})" for r in missing) + "."]
    if results["plots"]:
        lines += ["", "## Plots", "", "Lines: mean over the finished seeds; bands: min–max over seeds.", ""]
        lines += [f"![{p}]({p})" for p in results["plots"]]
    return "\n".join(lines) + "\n"
