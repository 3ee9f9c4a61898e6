"""The pre-registered study's report: experiments/prereg/report.md and report.json, rebuilt from the
per-run JSON files (<stage>/<run>.json) that scripts/prereg_study.py writes."""
from __future__ import annotations

import glob
import json
import os
import statistics
from typing import Optional

from . import prereg
from .compare.plots import shrink_png
from .prereg_cost import cost_table


COST_FILE = "cost.json"


def load_results(results_dir: str) -> dict:
    """{"A": {arm: {lr: result}}, "B" and "D": {arm: {seed: result}}, "chosen": {arm: lr}}."""
    out: dict = {"A": {}, "B": {}, "D": {}}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("stage") == "A" and r.get("seed") == 0:  # stage A is seed 0 only
            out["A"].setdefault(r["arm"], {})[r["lr"]] = r
        elif r.get("stage") in ("B", "D"):
            out[r["stage"]].setdefault(r["arm"], {})[r["seed"]] = r
    out["chosen"] = prereg.choose_lr({arm: {lr: dev_bpb(r) for lr, r in d.items()}
                                      for arm, d in out["A"].items()})
    return out


def dev_bpb(result: dict) -> float:
    return result["evals"]["dev"]["bpb"]["bpb"]


def test_bpb(result: dict) -> float:
    return result["evals"]["test"]["bpb"]["bpb"]


def _mean_over_seeds(per_seed: list[list[float]]) -> list[float]:
    return [statistics.mean(col) for col in zip(*per_seed)] if per_seed else []


def evaluation_curves(results: dict) -> dict:
    """Per stage B arm, each evaluation's curve averaged over its seeds (test text): `remembered`
    by distance (forgetting), bpb by position bucket, recall exact match by number of pairs,
    passkey accuracy by depth; each with its x values."""
    out: dict = {}
    for arm, runs in results["B"].items():
        tests = [r["evals"]["test"] for r in runs.values() if "test" in r.get("evals", {})]
        if not tests:
            continue
        curves = {}
        for name, path, x, y in (("forgetting", ("forgetting", "distances"), "distance", "remembered"),
                                 ("position", ("position", "buckets"), "start", "bpb"),
                                 ("recall", ("recall", "pairs"), "n_pairs", "exact_match"),
                                 ("passkey", ("passkey", "depths"), "depth", "accuracy")):
            rows = [t.get(path[0], {}).get(path[1]) for t in tests]
            if all(rows):
                curves[name] = {"x": [row[x] for row in rows[0]],
                                "y": _mean_over_seeds([[row[y] for row in rs] for rs in rows]),
                                "seeds": len(rows)}
        out[arm] = curves
    return out


def recall_summary(results: dict) -> dict:
    """Stage D, per arm: exact match by number of pairs and, at the trained number of pairs, by
    distance (means over seeds), the per-seed exact match at that number, and the paired
    contrasts of `all` against each arm on it (reported; no rule is about them)."""
    arms, em = {}, {}
    for arm, runs in results["D"].items():
        recs = {s: r["evals"]["recall"]["recall"] for s, r in runs.items()
                if "recall" in r.get("evals", {})}
        if not recs:
            continue
        rows = [rec["pairs"] for rec in recs.values()]
        at_n = {s: [p for p in rec["pairs"] if p["n_pairs"] == prereg.RECALL_PAIRS]
                for s, rec in recs.items()}
        em[arm] = {s: ps[0]["exact_match"] for s, ps in at_n.items() if ps}
        arms[arm] = {"seeds": len(recs), "pairs": [p["n_pairs"] for p in rows[0]],
                     "exact_match": _mean_over_seeds([[p["exact_match"] for p in rs] for rs in rows]),
                     "answer_loss": _mean_over_seeds([[p["answer_loss"] for p in rs] for rs in rows])}
        if len(em[arm]) == len(recs):  # every seed was scored at the trained number of pairs
            trained = [ps[0] for ps in at_n.values()]
            arms[arm]["distances"] = [d["distance"] for d in trained[0]["by_distance"]]
            arms[arm]["exact_match_by_distance"] = _mean_over_seeds(
                [[d["exact_match"] for d in p["by_distance"]] for p in trained])
    contrasts = {}
    if prereg.BASELINE in em:
        for other in (a for a in prereg.ARMS if a != prereg.BASELINE and a in em):
            seeds = sorted(set(em[prereg.BASELINE]) & set(em[other]))
            contrasts[other] = dict(prereg.paired_interval(
                [em[prereg.BASELINE][s] - em[other][s] for s in seeds]), seeds=seeds)
    return {"arms": arms, "contrasts": contrasts}


def plot_curves(curves: dict, out_dir: str, recall: Optional[dict] = None) -> list[str]:
    """forgetting.png (`remembered` by distance) and position.png (bpb by position) of stage B,
    and with stage D's `recall` (recall_summary) recall_distance.png (exact match by distance at
    the trained number of pairs); one line per arm; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots = [(name, xlabel, ylabel, {a: curves[a][name] for a in prereg.ARMS if name in curves.get(a, {})})
             for name, xlabel, ylabel in (
                 ("forgetting", "distance d (tokens)", "remembered (nats/token)"),
                 ("position", "position in the window (bucket start)", "bits per byte"))]
    arms_d = {a: d for a, d in (recall or {}).get("arms", {}).items() if "distances" in d}
    plots.append(("recall_distance", f"pairs between the asked key and the question "
                  f"({prereg.RECALL_PAIRS} pairs a context)", "exact match",
                  {a: {"x": arms_d[a]["distances"], "y": arms_d[a]["exact_match_by_distance"],
                       "seeds": arms_d[a]["seeds"]} for a in prereg.ARMS if a in arms_d}))
    written = []
    for name, xlabel, ylabel, series in plots:
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arm, c in series.items():
            ax.plot(c["x"], c["y"], marker="o", label=f"{arm} ({c['seeds']} seeds)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        shrink_png(path)  # the driver commits the plots after every run
        written.append(path)
    return written


def summarize(results: dict) -> dict:
    a = {arm: {f"{lr:g}": dev_bpb(r) for lr, r in sorted(d.items())} for arm, d in results["A"].items()}
    test = {arm: {s: test_bpb(r) for s, r in d.items()} for arm, d in results["B"].items()}
    dev = {arm: {s: dev_bpb(r) for s, r in d.items()} for arm, d in results["B"].items()}
    c = prereg.contrasts(test, prereg.BASELINE,
                         [x for x in prereg.ARMS if x != prereg.BASELINE]) if prereg.BASELINE in test else {}
    word, reasons = prereg.verdict(c)
    hours = sum(r["train_s"] + r["eval_s"] for st in ("A", "B", "D") for d in results[st].values()
                for r in d.values()) / 3600
    return {"stage_a_dev_bpb": a, "chosen_lr": {k: f"{v:g}" for k, v in results["chosen"].items()},
            "stage_b_test_bpb": {arm: {str(s): v for s, v in sorted(d.items())} for arm, d in test.items()},
            "stage_b_dev_bpb": {arm: {str(s): v for s, v in sorted(d.items())} for arm, d in dev.items()},
            "contrasts": c, "verdict": word, "reasons": reasons, "core_hours": round(hours, 2),
            "curves": evaluation_curves(results), "recall": recall_summary(results),
            "runs": {st: sum(len(d) for d in results[st].values()) for st in ("A", "B", "D")}}


def _ci(x) -> str:
    return f"[{x[0]:+.4f}, {x[1]:+.4f}]" if x else "–"


def report_md(s: dict) -> str:
    lines = ["# The pre-registered study: results so far", "",
             "Rebuilt by `python -m scripts.prereg_study --report` from the run files beside it; the rule "
             "and the stages are in [docs/study.md](../../docs/study.md#the-pre-registered-study-written-"
             "2026-12-07-before-any-of-its-runs).", "",
             f"Runs finished: stage A {s['runs']['A']} of {len(prereg.stage_a_runs())}, stage B "
             f"{s['runs']['B']} of {len(prereg.ARMS) * len(prereg.SEEDS_B)}, stage D "
             f"{s['runs']['D']} of {len(prereg.ARMS) * len(prereg.SEEDS_D)}; "
             f"{s['core_hours']:.2f} core-hours (training and evaluation).", "",
             "## Stage A: dev bits per byte (seed 0, final checkpoint)", "",
             "| arm | " + " | ".join(f"lr {lr:g}" for lr in prereg.LRS) + " | chosen |",
             "|---|" + "---:|" * (len(prereg.LRS) + 1)]
    for arm in prereg.ARMS:
        d = s["stage_a_dev_bpb"].get(arm, {})
        lines.append(f"| `{arm}` | " + " | ".join(f"{d[f'{lr:g}']:.4f}" if f"{lr:g}" in d else "…"
                                                    for lr in prereg.LRS)
                     + f" | {s['chosen_lr'].get(arm, '…')} |")
    lines += ["", "## Stage B: test bits per byte (all of Turgenev, final checkpoint)", "",
              "| arm | lr | seeds | mean ± sd | dev bpb mean |", "|---|---:|---:|---:|---:|"]
    for arm in prereg.ARMS:
        t = list(s["stage_b_test_bpb"].get(arm, {}).values())
        d = list(s["stage_b_dev_bpb"].get(arm, {}).values())
        sd = f" ± {statistics.stdev(t):.4f}" if len(t) > 1 else ""
        lines.append(f"| `{arm}` | {s['chosen_lr'].get(arm, '…')} | {len(t)} | "
                     + (f"{statistics.mean(t):.4f}{sd}" if t else "…") + " | "
                     + (f"{statistics.mean(d):.4f}" if d else "…") + " |")
    lines += ["", f"## Contrasts: `{prereg.BASELINE}` − arm, paired by seed", "",
              "| arm | Δ bpb | 95% interval | Holm-level interval | p | Holm p | per seed |",
              "|---|---:|---|---|---:|---:|---|"]
    for arm, c in s["contrasts"].items():
        if c["mean"] is None:
            continue
        lines.append(f"| `{arm}` | {c['mean']:+.4f} | {_ci(c['ci95'])} | {_ci(c.get('ci_holm'))} | "
                     + (f"{c['p']:.3g}" if c["p"] is not None else "–") + " | "
                     + (f"{c['p_holm']:.3g}" if c.get("p_holm") is not None else "–") + " | "
                     + ", ".join(f"{x:+.4f}" for x in c["per_seed"]) + " |")
    lines += ["", f"## Verdict of the rule: **{s['verdict']}**", ""] + [f"- {r}" for r in s["reasons"]]
    lines += _curve_tables(s["curves"])
    lines += _recall_tables(s["recall"])
    if s.get("cost"):
        lines += cost_table(s["cost"])
    lines += [""] + [f"![{p[:-4]}]({p})" for p in s.get("plots", [])] if s.get("plots") else []
    if s["runs"]["B"] < len(prereg.ARMS) * len(prereg.SEEDS_B):
        lines += ["", "Stage B is not complete: this verdict is provisional and is not the study's."]
    return "\n".join(lines) + "\n"


def _curve_tables(curves: dict) -> list[str]:
    """One table per evaluation: arms as rows, the curve's x values as columns (seed means)."""
    lines = []
    for name, title in (("forgetting", "Forgetting: `remembered` (nats per token) at distance d"),
                        ("position", "Bits per byte by position in the window (bucket start)"),
                        ("recall", "Key-value recall exact match by number of pairs"),
                        ("passkey", "Passkey accuracy by depth")):
        arms = [a for a in prereg.ARMS if name in curves.get(a, {})]
        if not arms:
            continue
        xs = curves[arms[0]][name]["x"]
        lines += ["", f"### {title} (stage B, mean over seeds)", "",
                  "| arm | " + " | ".join(f"{x:g}" for x in xs) + " |", "|---|" + "---:|" * len(xs)]
        for arm in arms:
            lines.append(f"| `{arm}` | " + " | ".join(f"{y:+.4f}" if name == "forgetting" else f"{y:.4f}"
                                                     for y in curves[arm][name]["y"]) + " |")
    return lines


def _recall_tables(r: dict) -> list[str]:
    arms = [a for a in prereg.ARMS if a in r["arms"]]
    if not arms:
        return []
    n = prereg.RECALL_PAIRS
    xs = r["arms"][arms[0]]["pairs"]
    lines = ["", f"## Stage D: associative recall ({n} pairs a context, every pair asked; "
             "exact match, mean over seeds)", "",
             "| arm | seeds | " + " | ".join(f"{x} pairs" for x in xs) + " |",
             "|---|---:|" + "---:|" * len(xs)]
    for arm in arms:
        a = r["arms"][arm]
        lines.append(f"| `{arm}` | {a['seeds']} | " + " | ".join(f"{y:.4f}" for y in a["exact_match"]) + " |")
    with_d = [a for a in arms if "distances" in r["arms"][a]]
    if with_d:
        ds = r["arms"][with_d[0]]["distances"]
        lines += ["", f"Exact match at {n} pairs by distance (pairs between the asked key and the "
                  "question):", "", "| arm | " + " | ".join(str(d) for d in ds) + " |",
                  "|---|" + "---:|" * len(ds)]
        for arm in with_d:
            ys = r["arms"][arm]["exact_match_by_distance"]
            lines.append(f"| `{arm}` | " + " | ".join(f"{y:.3f}" for y in ys) + " |")
    if r["contrasts"]:
        lines += ["", f"`{prereg.BASELINE}` − arm, exact match at {n} pairs, paired by seed "
                  "(reported, not part of the rule):", "",
                  "| arm | Δ | 95% interval | per seed |", "|---|---:|---|---|"]
        for arm, c in r["contrasts"].items():
            lines.append(f"| `{arm}` | {c['mean']:+.4f} | {_ci(c['ci95'])} | "
                         + ", ".join(f"{x:+.4f}" for x in c["per_seed"]) + " |")
    return lines


def write_report(results_dir: str) -> dict:
    s = summarize(load_results(results_dir))
    os.makedirs(results_dir, exist_ok=True)
    cost_path = os.path.join(results_dir, COST_FILE)
    if os.path.exists(cost_path):  # scripts/prereg_study.py --cost
        with open(cost_path) as f:
            s["cost"] = json.load(f)
    s["plots"] = [os.path.basename(p) for p in plot_curves(s["curves"], results_dir, s["recall"])]
    for name, text in (("report.md", report_md(s)), ("report.json", json.dumps(s, indent=1) + "\n")):
        tmp = os.path.join(results_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(results_dir, name))
    return s
