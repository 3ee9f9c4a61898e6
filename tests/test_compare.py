"""compare.py: aggregation over seeds on fabricated metric files, the resume decision, the report and
its plots, user mistakes in one sentence, and the schedule picture's colours."""
import json
import os
import statistics

import numpy as np
import pytest

from reflex_jax.errors import ConfigError, UsageError
from reflex_jax.model import ModelConfig
from reflex_jax.run_config import load_config, split_overrides
from reflex_lab.compare import cli as compare_cli
from reflex_lab.compare import runs as compare_runs
from reflex_lab.compare.grid import (CompareError, Variant, parse_schedules, parse_seeds, parse_variant,
                                     plan_grid)
from reflex_lab.compare.report import variant_differences, write_report
from reflex_lab.compare.runs import RUN_MARKER, read_metrics, run_grid, run_state
from reflex_lab.compare.stats import aggregate, collect, model_facts, summarize_run
from reflex_lab.schedule_plot import layer_colors, plot_schedule, source_head_matrix, source_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
SMALL = [("model.n_layer", "3"), ("model.n_embd", "32"), ("max_steps", "30"), ("eval_interval", "10"),
         ("log_interval", "5")]


def small_config(**extra):
    return load_config(TINY, SMALL + [(k, str(v)) for k, v in extra.items()])


def fabricate(run_dir, val_losses, *, max_steps=30, eval_every=10, log_every=5, stop_at=None,
              exact=None, tok_s=1000.0):
    """A metrics.jsonl like the trainer writes: a row every `log_every` steps, eval rows every
    `eval_every` steps with the given val losses (and exact matches)."""
    os.makedirs(run_dir, exist_ok=True)
    last = stop_at or max_steps
    rows = []
    for step in range(log_every, last + 1, log_every):
        row = {"step": step, "loss": 4.0 - step / 100, "lr": 1e-3, "grad_norm": 1.0,
               "tokens": step * 32 * 96, "tokens_per_s": tok_s + step, "mfu": 0.01}
        if step % eval_every == 0 and val_losses:
            k = step // eval_every - 1
            row.update(val_loss=val_losses[k], val_ppl=float(np.exp(val_losses[k])))
            if exact is not None:
                row["exact_match"] = exact[k]
            row["tokens_per_s"] = 10.0  # an eval interval is slow; the summary must not use it
        rows.append(row)
    rows[0]["tokens_per_s"] = 1.0  # the first interval compiles
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---- one run ------------------------------------------------------------------------------------

def test_summarize_run_final_best_exact_match_and_throughput(tmp_path):
    fabricate(tmp_path / "r", [3.0, 2.5, 2.7], exact=[0.1, 0.4, 0.3])
    s = summarize_run(read_metrics(str(tmp_path / "r" / "metrics.jsonl")), 30)
    assert s["finished"] and s["step"] == 30 and s["eval_rows"] == 3
    assert (s["final_val_loss"], s["final_val_step"]) == (2.7, 30)
    assert (s["best_val_loss"], s["best_val_step"]) == (2.5, 20)
    assert s["final_exact_match"] == 0.3 and s["best_exact_match"] == 0.4
    # steady rows only: steps 5, 15, 25 (not the compiling first row, not eval rows)
    assert s["tokens_per_s"] == statistics.median([1015.0, 1025.0])
    assert s["tokens"] == 30 * 32 * 96


def test_missing_eval_rows_and_a_torn_line(tmp_path):
    fabricate(tmp_path / "r", [])  # eval turned off: no val rows at all
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 35, "loss": 1.')  # killed mid-write
    s = summarize_run(read_metrics(str(tmp_path / "r" / "metrics.jsonl")), 30)
    assert s["step"] == 30 and s["finished"]
    assert s["final_val_loss"] is None and s["best_val_loss"] is None and s["final_exact_match"] is None


def test_resumed_run_keeps_the_rewritten_rows(tmp_path):
    d = tmp_path / "r"
    os.makedirs(d)
    rows = [{"step": 10, "loss": 3.0, "val_loss": 9.0}, {"step": 10, "loss": 3.0, "val_loss": 2.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(str(d / "metrics.jsonl")) == [rows[1]]


# ---- grid aggregation -----------------------------------------------------------------------------

FINAL = {"none": [2.0, 2.2, 2.4], "all": [1.9, 2.0, 2.6]}


def fabricated_grid(tmp_path, unfinished=None):
    config = small_config()
    runs = plan_grid(config, ["none", "all"], [0, 1, 2], str(tmp_path / "runs"))
    for run in runs:
        finals = FINAL[run.schedule]
        vals = [3.0, 2.8, finals[run.seed]]
        stop = 20 if run.name == unfinished else None
        fabricate(run.run_dir, vals, stop_at=stop, exact=[0.0, 0.5, 1.0 - finals[run.seed] / 4])
    return runs


def test_mean_and_sample_std_over_seeds_and_paired_delta(tmp_path):
    runs = fabricated_grid(tmp_path)
    groups = {g["group"]: g for g in aggregate(collect(runs))}
    assert list(groups) == ["none", "all"]
    for name, finals in FINAL.items():
        g = groups[name]
        assert g["finished"] == 3 and g["seeds"] == [0, 1, 2]
        assert g["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert g["final_val_loss"]["std"] == pytest.approx(statistics.stdev(finals))  # ddof=1
        assert g["best_val_loss"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert g["final_exact_match"]["mean"] == pytest.approx(statistics.fmean(1 - v / 4 for v in finals))
    diffs = [a - b for a, b in zip(FINAL["all"], FINAL["none"])]
    assert "delta_final_val_loss" not in groups["none"]
    assert groups["all"]["delta_vs"] == "none"
    assert groups["all"]["delta_final_val_loss"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert groups["all"]["delta_final_val_loss"]["std"] == pytest.approx(statistics.stdev(diffs))


def test_best_differs_from_final_when_the_loss_rises(tmp_path):
    config = small_config()
    runs = plan_grid(config, ["all"], [0, 1], str(tmp_path / "runs"))
    fabricate(runs[0].run_dir, [3.0, 2.0, 2.5])
    fabricate(runs[1].run_dir, [3.0, 2.2, 2.1])
    (g,) = aggregate(collect(runs))
    assert g["best_val_loss"]["mean"] == pytest.approx(2.05)
    assert g["final_val_loss"]["mean"] == pytest.approx(2.3)


def test_unfinished_run_is_reported_and_left_out_of_the_means(tmp_path):
    runs = fabricated_grid(tmp_path, unfinished="all-s2")
    summaries = collect(runs)
    status = {s["name"]: s["status"] for s in summaries}
    assert status["all-s2"] == "unfinished (step 20 of 30)"
    assert status["none-s2"] == "finished"
    g = {g["group"]: g for g in aggregate(summaries)}["all"]
    assert g["finished"] == 2 and g["runs"] == 3 and g["seeds"] == [0, 1]
    assert g["not_finished"] == {"all-s2": "unfinished (step 20 of 30)"}
    assert g["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(FINAL["all"][:2]))
    out = tmp_path / "out"
    write_report(str(out), runs, summaries, aggregate(summaries))
    md = (out / "results.md").read_text()
    assert "| `all` |" in md and "2/3 (0, 1)" in md
    assert "`all-s2` (unfinished (step 20 of 30))" in md


def test_missing_run_is_reported(tmp_path):
    config = small_config()
    runs = plan_grid(config, ["none"], [0, 1], str(tmp_path / "runs"))
    fabricate(runs[0].run_dir, [3.0, 2.5, 2.0])
    summaries = collect(runs)
    assert [s["status"] for s in summaries] == ["finished", "missing"]
    (g,) = aggregate(summaries)
    assert g["final_val_loss"] == {"mean": 2.0, "std": None, "n": 1}


def test_report_files_tables_and_small_plots(tmp_path):
    import matplotlib.image as mpimg
    from PIL import Image

    runs = fabricated_grid(tmp_path)
    summaries = collect(runs)
    out = tmp_path / "out"
    res = write_report(str(out), runs, summaries, aggregate(summaries), command="x")
    assert sorted(res["plots"]) == ["exact_match_vs_step.png", "val_loss_vs_step.png",
                                    "val_loss_vs_tokens.png"]
    for p in res["plots"]:
        img = mpimg.imread(out / p)
        assert img.shape[:2] == (500, 800)
        assert os.path.getsize(out / p) < 100_000
        with Image.open(out / p) as im:
            assert im.mode == "P"  # palette PNG: small in git
    data = json.loads((out / "results.json").read_text())
    g = {g["group"]: g for g in data["groups"]}
    # model facts from the ModelConfig: 3 layers x 8 heads of size 4, float32
    assert g["none"]["kv_heads"] == 24 and g["all"]["kv_heads"] == 8 + 7 + 6
    assert g["none"]["kv_bytes_per_token"] == 2 * 24 * 4 * 4
    assert g["all"]["kv_bytes_per_token"] == 2 * 21 * 4 * 4
    assert g["none"]["params"] > g["all"]["params"]  # no K/V projections for cross heads
    assert data["setup"]["tokens_per_run"] == 30 * 32 * 96
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `all` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "8 / 7+1 / 6+2"   # the layout, not split into extra cells
    assert cells[3] == f"{statistics.fmean(FINAL['all']):.3f} ± {statistics.stdev(FINAL['all']):.3f}"
    assert "![val_loss_vs_step.png](val_loss_vs_step.png)" in md


def test_no_eval_rows_gives_dashes_and_no_plots(tmp_path):
    config = small_config()
    runs = plan_grid(config, ["none"], [0], str(tmp_path / "runs"))
    fabricate(runs[0].run_dir, [])
    summaries = collect(runs)
    res = write_report(str(tmp_path / "out"), runs, summaries, aggregate(summaries))
    assert res["plots"] == []
    row = next(l for l in (tmp_path / "out" / "results.md").read_text().splitlines()
               if l.startswith("| `none` |"))
    assert row.split("|")[4].strip() == "—"


# ---- resumability -----------------------------------------------------------------------------------

def test_run_state_decides_train_resume_or_reuse(tmp_path):
    config = small_config()
    (run,) = plan_grid(config, ["all"], [0], str(tmp_path / "runs"))
    d = run.run_dir
    assert run_state(d, run.config).kind == "new"
    fabricate(d, [3.0], stop_at=10)
    st = run_state(d, run.config)
    assert (st.kind, st.step) == ("partial", 10)
    fabricate(d, [3.0, 2.9, 2.8])
    assert run_state(d, run.config).kind == "finished"  # no checkpoints written at all
    os.makedirs(os.path.join(d, "checkpoints", "20"))
    assert run_state(d, run.config).kind == "partial"   # final checkpoint not there yet
    os.makedirs(os.path.join(d, "checkpoints", "30"))
    assert run_state(d, run.config).kind == "finished"
    # a longer grid must not reuse it: its cosine schedule differs, so the config check says so
    longer = plan_grid(small_config(max_steps=60), ["all"], [0], str(tmp_path / "runs"))[0]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(run.config.to_dict(), f, default=str)
    assert run_state(d, run.config).kind == "finished"  # same config: fine
    with pytest.raises(CompareError, match=r"different config \(max_steps=30 there, 60 here\)"):
        run_state(d, longer.config)


def test_failed_run_is_recorded_and_not_retried_by_default(tmp_path):
    config = small_config()
    (run,) = plan_grid(config, ["all"], [0], str(tmp_path / "runs"))
    fabricate(run.run_dir, [3.0], stop_at=10)
    with open(os.path.join(run.run_dir, RUN_MARKER), "w") as f:
        json.dump({"error": "loss became nan at step 11", "wall_s": 3.0}, f)
    st = run_state(run.run_dir, run.config)
    assert (st.kind, st.detail) == ("failed", "loss became nan at step 11")
    assert run_grid([run], log=lambda s: None) == {"all-s0": "failed"}
    (s,) = collect([run])
    assert s["status"] == "failed at step 10: loss became nan at step 11"


def test_run_grid_trains_only_what_is_not_finished(tmp_path, monkeypatch):
    config = small_config()
    runs = plan_grid(config, ["none", "all"], [0, 1], str(tmp_path / "runs"))
    fabricate(runs[0].run_dir, [3.0, 2.9, 2.8])              # none-s0 finished
    fabricate(runs[1].run_dir, [3.0], stop_at=10)            # none-s1 half-way
    trained = []

    def fake_train(run, log=print):
        trained.append(run.name)
        fabricate(run.run_dir, [3.0, 2.9, 2.8])
        return {"final_step": 30, "stopped_by": None}

    monkeypatch.setattr(compare_runs, "train_run", fake_train)
    outcome = run_grid(runs, log=lambda s: None)
    assert trained == ["none-s1", "all-s0", "all-s1"]
    assert outcome == {"none-s0": "reused", "none-s1": "resumed", "all-s0": "trained", "all-s1": "trained"}
    trained.clear()
    assert set(run_grid(runs, log=lambda s: None).values()) == {"reused"}
    assert trained == []


def test_a_lost_run_directory_keeps_its_recorded_numbers_and_curves(tmp_path, monkeypatch):
    import shutil

    from reflex_lab.compare.plots import _curves
    from reflex_lab.compare.runs import read_recorded

    runs = fabricated_grid(tmp_path)
    out = str(tmp_path / "out")
    before = collect(runs)
    write_report(out, runs, before, aggregate(before))
    shutil.rmtree(runs[1].run_dir)  # none-s1: its checkpoints and metrics are gone
    assert collect(runs)[1]["status"] == "missing"  # without the record it would drop out
    recorded = read_recorded(out)
    after = collect(runs, recorded)
    assert after[1]["source"] == "recorded" and after[1]["status"] == "finished"
    assert {k: v for k, v in after[1].items() if k != "source"} == before[1]
    assert aggregate(after) == aggregate(before)
    assert _curves(runs, after, "val_loss", "step")["none"][4] == 3  # its curve still drawn
    trained = []
    monkeypatch.setattr(compare_runs, "train_run", lambda run, log=print: trained.append(run.name))
    outcome = run_grid(runs, recorded=recorded, log=lambda s: None)
    assert trained == [] and outcome["none-s1"] == "recorded" and outcome["none-s0"] == "reused"
    write_report(out, runs, after, aggregate(after))
    assert "| `none-s1` | 1 | finished (recorded) |" in (tmp_path / "out" / "results.md").read_text()
    # the record of a run trained with another config is not taken for this grid's run
    other = plan_grid(small_config(max_steps=40), ["none", "all"], [0, 1, 2], str(tmp_path / "runs"))
    with pytest.raises(CompareError,
                       match="records a finished run 'none-s1' trained with a different config"):
        collect(other, recorded)


def test_a_record_counts_only_for_the_data_it_was_trained_on(tmp_path):
    """Records name their data by its fingerprint: the same data prepared elsewhere (a fresh
    checkout) keeps them; other data in a directory of the same name does not."""
    import shutil

    from reflex_jax.data.prepare import prepare_task
    from reflex_lab.compare.runs import read_recorded

    def grid(data_dir):
        config = small_config(**{"data.task": "", "data.dir": data_dir})
        return plan_grid(config, ["none"], [0], str(tmp_path / "runs"))

    here = str(tmp_path / "a" / "arith")
    prepare_task("arith", here, n_train=200, n_val=8, verbose=False, max_operand=20)
    runs = grid(here)
    fabricate(runs[0].run_dir, [3.0, 2.8, 2.5])
    before = collect(runs)
    assert before[0]["data_sha"] and before[0]["status"] == "finished"
    out = str(tmp_path / "out")
    write_report(out, runs, before, aggregate(before))
    shutil.rmtree(runs[0].run_dir)
    recorded = read_recorded(out)
    elsewhere = str(tmp_path / "b" / "arith")  # the same data, prepared into another checkout
    prepare_task("arith", elsewhere, n_train=200, n_val=8, verbose=False, max_operand=20)
    (kept,) = collect(grid(elsewhere), recorded)
    assert kept["source"] == "recorded" and kept["final_val_loss"] == before[0]["final_val_loss"]
    shutil.rmtree(elsewhere)
    prepare_task("arith", elsewhere, n_train=300, n_val=8, verbose=False, max_operand=20)
    with pytest.raises(CompareError, match="trained on other data than .* holds now"):
        collect(grid(elsewhere), recorded)


def test_grid_stops_when_a_run_is_interrupted(tmp_path, monkeypatch):
    runs = plan_grid(small_config(), ["none", "all"], [0], str(tmp_path / "runs"))
    monkeypatch.setattr(compare_runs, "train_run",
                        lambda run, log=print: {"final_step": 12, "stopped_by": "SIGINT"})
    assert run_grid(runs, log=lambda s: None) == {"none-s0": "stopped"}


def test_an_interrupted_grid_exits_75_and_one_out_has_one_compare(tmp_path, monkeypatch, capsys):
    """compare.py after a run stopped by SIGINT exits 75 like train.py (run it again to resume);
    a second compare.py on an --out that a live one holds refuses in one sentence."""
    import subprocess
    import sys
    out = tmp_path / "o"
    args = ["--out", str(out), "--runs_dir", str(tmp_path / "runs"), "--schedules", "none",
            "--seeds", "0", "--config.max_steps=4"]
    monkeypatch.setattr(compare_runs, "train_run",
                        lambda run, log=print: {"final_step": 2, "stopped_by": "SIGINT"})
    assert compare_cli.main(args) == 75
    assert not (out / "compare.lock").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (out / "compare.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        capsys.readouterr()
        assert compare_cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"compare.py: error: --out {str(out)!r} is in use by process {holder.pid} on "
                       f"{socket.gethostname()} (lock {out / 'compare.lock'}); wait for that run, use "
                       "another --out, or delete the lock file if that run is no longer alive."], err
    finally:
        holder.kill()


# ---- the grid and user mistakes ---------------------------------------------------------------------

def test_schedules_seeds_variants_and_run_names(tmp_path):
    assert parse_schedules("none,all,recent:2,1") == ["none", "all", "recent:2,1"]
    assert parse_schedules("recent:1,1;all") == ["recent:1,1", "all"]
    assert parse_schedules("kv:8,7,6,5,4,3,fewer:recent:2,1,cla:2,gqa:2") == [
        "kv:8,7,6,5,4,3", "fewer:recent:2,1", "cla:2", "gqa:2"]
    assert parse_schedules("all,recent:2,1+value_residual,all+value_residual") == [
        "all", "recent:2,1+value_residual", "all+value_residual"]
    plain, vr = plan_grid(small_config(), ["all", "all+value_residual"], [0], str(tmp_path))
    assert (vr.name, vr.group, vr.config.model.head_plan) == ("all-value_residual-s0",
                                                              "all+value_residual", "all")
    assert vr.config.model.value_residual and not plain.config.model.value_residual
    # two mixing scalars per layer after the first
    assert model_facts(vr.config)["params"] == model_facts(plain.config)["params"] + 2 * (
        plain.config.model.n_layer - 1)
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    v = parse_variant("pre:init_from=weights/x;optim.lr=1e-4")
    assert v == Variant("pre", (("init_from", "weights/x"), ("optim.lr", "1e-4")))
    runs = plan_grid(small_config(), ["recent:2,1"], [3], str(tmp_path),
                             [v, parse_variant("random:")])
    assert [r.name for r in runs] == ["pre-recent-2-1-s3", "random-recent-2-1-s3"]
    assert runs[0].config.optim.lr == 1e-4 and runs[0].config.init_from == "weights/x"
    assert runs[1].config.optim.lr == small_config().optim.lr
    assert runs[0].config.seed == 3 and runs[0].config.model.head_plan == "recent:2,1"
    assert runs[0].group == "pre recent:2,1"
    assert variant_differences(runs) == {
        "pre": {"init_from": "weights/x", "optim.lr": 1e-4},
        "random": {"init_from": "", "optim.lr": small_config().optim.lr}}


@pytest.mark.parametrize("call, error, message", [
    (lambda: parse_schedules("1,all"), CompareError, r"number 1 follows no 'recent:'"),
    (lambda: parse_schedules("all,all"), CompareError, r"lists all more than once"),
    (lambda: parse_seeds("0,a"), CompareError, r"'a' is not a non-negative integer"),
    (lambda: parse_variant("no colon"), CompareError, r"NAME:key=value"),
    (lambda: parse_variant("x:lr"), CompareError, r"'lr' is not key=value"),
    (lambda: plan_grid(small_config(), ["alll"], [0], "r"), CompareError,
     r"schedule 'alll' does not fit .*'alll' is unknown"),
    (lambda: plan_grid(load_config(TINY, [("model.n_head", "4")]), ["recent:2,1"], [0], "r"), CompareError,
     r"schedule 'recent:2,1' does not fit this model \(4 layers x 4 heads\)"
     r".*layer 3 wants 2 heads of layer 2"),
    (lambda: plan_grid(small_config(), ["all"], [0], "r", [parse_variant("x:seed=3")]), CompareError,
     r"sets seed, which the grid sets itself; use --seeds"),
    (lambda: load_config("configs/nope.py"), ConfigError, r"config file 'configs/nope.py' does not exist"),
    (lambda: load_config(TINY, [("model.n_layr", "2")]), ConfigError, r"did you mean 'model.n_layer'"),
    (lambda: load_config(TINY, [("model.n_layer", "two")]), ConfigError,
     r"'model.n_layer' takes an integer, got 'two'"),
    (lambda: load_config(TINY, [("model", "2")]), ConfigError, r"is a group, not a value"),
    (lambda: split_overrides(["--max_steps=3"]), UsageError, r"unknown argument '--max_steps=3'"),
])
def test_user_mistakes_are_one_sentence(call, error, message):
    with pytest.raises(error, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    code = compare_cli.main(["--out", str(tmp_path / "o"), "--config.model.head_plan=all"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "set per run by the grid; use --schedules" in err
    assert compare_cli.main(["--out", str(tmp_path / "o"), "--config", "configs/nope.py"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overrides_are_typed_like_the_config():
    c = load_config(TINY, split_overrides(
        ["--config.optim.lr=1e-4", "--config.max_steps", "7", "--config.model.reflex_window=2",
         "--config.async_checkpoints=false", "--config.data.task=kv_recall"]))
    assert c.optim.lr == 1e-4 and c.max_steps == 7 and c.model.reflex_window == 2
    assert c.async_checkpoints is False and c.data.task == "kv_recall"


def test_plan_prints_each_run(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    fabricate(runs_dir / "all-s1", [3.0, 2.9, 2.8], max_steps=4, eval_every=2, log_every=1)
    assert compare_cli.main(["--out", str(tmp_path / "o"), "--runs_dir", str(runs_dir), "--schedules",
                         "none,all", "--seeds", "0,1", "--plan", "--config.max_steps=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = {line.split()[0]: line.split()[1] for line in lines}
    assert kinds == {"none-s0": "new", "none-s1": "new", "all-s0": "new", "all-s1": "finished"}


# ---- schedule picture ----------------------------------------------------------------------------------

def test_schedule_matrices_follow_the_design():
    all68 = ModelConfig(n_layer=6, n_head=8, n_embd=64, head_plan="all")
    m = source_matrix(all68)
    assert m[0].tolist() == [0] * 8
    assert m[5].tolist() == [5, 5, 5, 4, 3, 2, 1, 0]   # 3 self, then newest source first
    assert (m <= np.arange(6)[:, None]).all()
    # cross heads read the source layer's *last* self heads
    assert source_head_matrix(all68)[5].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    r21 = ModelConfig(n_layer=6, n_head=8, n_embd=64, head_plan="recent:2,1")
    assert source_matrix(r21)[2].tolist() == [2] * 5 + [1, 1, 0]
    assert source_head_matrix(r21)[2].tolist() == [0, 1, 2, 3, 4, 4, 5, 7]  # L1 keeps 6 self heads


@pytest.mark.parametrize("reflex", ["all", "recent:2,1", "none"])
def test_schedule_png_cells_have_the_source_layer_colour(tmp_path, reflex):
    import matplotlib.image as mpimg

    cfg = ModelConfig(n_layer=6, n_head=8, n_embd=64, head_plan=reflex)
    pic = plot_schedule(cfg, str(tmp_path / "s.png"))
    img = mpimg.imread(tmp_path / "s.png")
    assert img.shape[:2] == (pic.size[1], pic.size[0]) == (500, 800)
    assert os.path.getsize(tmp_path / "s.png") < 100_000
    palette = layer_colors(6)
    assert len({tuple(c) for c in palette}) == 6
    sources = source_matrix(cfg)
    for l in range(6):
        for h in range(8):
            x0, y0, x1, y1 = pic.cell_boxes[l, h]
            # a pixel well inside the cell, away from its grid lines and its centred label
            px = img[int(y0 + 0.2 * (y1 - y0)), int(x0 + 0.12 * (x1 - x0))][:3]
            assert np.allclose(px, palette[sources[l, h]][:3], atol=2 / 255), (l, h, px)
            assert np.allclose(pic.colors[l, h], palette[sources[l, h]])
    self_cells = sum(row.count("S") for row in pic.labels)
    assert self_cells == cfg.kv_heads_total


def test_schedule_plot_cli(tmp_path, capsys):
    from reflex_lab import schedule_plot
    out = tmp_path / "p.png"
    assert schedule_plot.main(["--config", TINY, "--schedule", "recent:1", "--out", str(out)]) == 0
    assert out.exists() and "recent:1 4x8: 8 | 7+1 | 7+1 | 7+1" in capsys.readouterr().out
    assert schedule_plot.main(["--config", TINY, "--schedule", "bogus", "--out", str(out)]) == 2
    assert "model.head_plan='bogus' is unknown" in capsys.readouterr().err


# ---- one real (tiny) run through the command line ----------------------------------------------------

@pytest.mark.slow
def test_cli_trains_reports_and_reuses_a_finished_run(tmp_path, capsys):
    args = ["--config", TINY, "--schedules", "recent:1", "--seeds", "0", "--out", str(tmp_path / "out"),
            "--runs_dir", str(tmp_path / "runs"), "--config.model.n_layer=2", "--config.model.n_head=2",
            "--config.model.n_embd=16", "--config.max_steps=2", "--config.eval_interval=2",
            "--config.batch_size=4", "--config.eval_batches=1", "--config.data.task_rows=64",
            "--config.data.task_val_rows=4", "--config.eval_exact_match=0", "--config.log_interval=1",
            "--config.checkpoint_interval=0", "--config.async_checkpoints=false"]
    assert compare_cli.main(args) == 0
    assert "[1/1] recent-1-s0: training" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "recent-1-s0"
    assert (run_dir / "checkpoints" / "2").is_dir() and (run_dir / RUN_MARKER).exists()
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    (run,) = data["runs"]
    assert run["status"] == "finished" and run["final_val_step"] == 2
    assert run["final_val_loss"] is not None and run["wall_s"] > 0
    assert data["groups"][0]["layout"] == "recent:1 2x2: 2 | 1+1"
    assert compare_cli.main(args) == 0  # again: nothing is trained
    assert "finished before (step 2), reused" in capsys.readouterr().out
    import shutil
    shutil.rmtree(run_dir)  # runs/ lost: the report's record stands for the run
    assert compare_cli.main(args) == 0
    assert "recorded in the report (run directory gone), reused" in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert again["final_val_loss"] == run["final_val_loss"] and again["source"] == "recorded"
    assert not run_dir.exists()
    # a driver training one run into a scratch --out reads the records of the full report
    scratch = [a if a != str(tmp_path / "out") else str(tmp_path / "scratch") for a in args]
    assert compare_cli.main(scratch + ["--recorded_from", str(tmp_path / "out")]) == 0
    assert "recorded in the report (run directory gone), reused" in capsys.readouterr().out
    assert not run_dir.exists()
    assert compare_cli.main(args + ["--config.optim.lr=0.01"]) == 2  # another grid, same --out
    assert "records a finished run 'recent-1-s0' trained with a different config" in capsys.readouterr().err


def test_paired_differences_against_controls_and_the_summary_plots(tmp_path, capsys):
    import matplotlib.image as mpimg

    from reflex_jax.run_config import model_config_from
    from reflex_jax.train.flops import train_flops_per_token

    runs = plan_grid(small_config(), ["none", "all", "fewer:all"], [0, 1], str(tmp_path / "runs"))
    # final bpb and exact match at distance 1 and 2 per (schedule, seed)
    bpb = {"none": (1.0, 1.2), "all": (1.1, 1.25), "fewer:all": (1.3, 1.2)}
    em = {"none": (0.5, 0.3), "all": (0.75, 0.5), "fewer:all": (0.25, 0.25)}
    for run in runs:
        fabricate(run.run_dir, [3.0, 2.8, 2.0 + bpb[run.schedule][run.seed]])
        path = os.path.join(run.run_dir, "metrics.jsonl")
        rows = [json.loads(line) for line in open(path)]
        for r in rows:
            if "val_loss" in r:
                r.update(val_bpb=bpb[run.schedule][run.seed], exact_match=em[run.schedule][run.seed],
                         exact_match_d1=em[run.schedule][run.seed], exact_match_d2=0.1)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    summaries = collect(runs)
    groups = aggregate(summaries, also_against=["fewer:all"])
    g = {x["group"]: x for x in groups}
    assert set(g["all"]["paired"]) == {"none", "fewer:all"} and set(g["none"]["paired"]) == {"fewer:all"}
    vs_fewer = g["all"]["paired"]["fewer:all"]
    assert vs_fewer["final_val_bpb"]["mean"] == pytest.approx(statistics.fmean([1.1 - 1.3, 1.25 - 1.2]))
    assert vs_fewer["final_val_bpb"]["std"] == pytest.approx(statistics.stdev([1.1 - 1.3, 1.25 - 1.2]))
    assert vs_fewer["final_exact_match"]["mean"] == pytest.approx(0.375)
    assert g["fewer:all"]["paired"]["none"]["final_val_loss"]["mean"] == pytest.approx(0.15)
    out = tmp_path / "out"
    res = write_report(str(out), runs, summaries, groups)
    assert {"bpb_vs_kv_bytes.png", "exact_match_by_distance.png"} <= set(res["plots"])
    for p in ("bpb_vs_kv_bytes.png", "exact_match_by_distance.png"):
        assert mpimg.imread(out / p).shape[:2] == (500, 800)
    md = (out / "results.md").read_text().splitlines()
    start = md.index("Δ final val bpb:")
    assert md[start + 2] == "| group | vs `none` | vs `fewer:all` |"
    assert md[start + 5] == "| `all` | +0.075 ± 0.035 | -0.075 ± 0.177 |"
    assert "| `fewer:all` | +0.150 ± 0.212 | — |" in md
    head = [c.strip() for c in next(l for l in md if l.startswith("| group | layout")).strip("|").split("|")]
    row = [c.strip() for c in next(l for l in md if l.startswith("| `all` | 8")).strip("|").split("|")]
    flops = train_flops_per_token(model_config_from(runs[2].config), runs[2].config.model.block_size)
    assert row[head.index("train FLOPs/token")] == f"{flops / 1e6:.2f} M"
    # --controls must name a group of the grid
    assert compare_cli.main(["--config", TINY, "--schedules", "none,all", "--seeds", "0", "--out",
                             str(tmp_path / "x"), "--controls", "gqa:2", "--report_only"]) == 2
    err = capsys.readouterr().err
    assert "--controls names 'gqa:2', which is not a group of this grid (none, all)" in err
