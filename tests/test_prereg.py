"""The pre-registered study's parts (reflex_lab/prereg.py, prereg_report.py): its dev split, its runs'
settings, the paired intervals, Holm's correction and the rule's verdict on hand-checkable numbers."""
import json
import math
import os

import pytest

from reflex_lab import prereg
from reflex_lab.prereg_report import load_results, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_chunks_cut_at_line_ends_and_join_back():
    text = "".join(f"строка {i}\n" for i in range(100))  # 'строка' is 12 UTF-8 bytes
    chunks = prereg.chunk_text(text, 64)
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)
    assert all(len(c.encode()) >= 64 for c in chunks[:-1])
    assert all(len(c.encode()) - len(c.splitlines(True)[-1].encode()) < 64 for c in chunks)


def _authors(root, sizes):
    for author, n_files in sizes.items():
        os.makedirs(root / author)
        for f in range(n_files):
            (root / author / f"book{f}.txt").write_text(
                "".join(f"{author} {f} {i}\n" for i in range(400)), encoding="utf-8")


def test_dev_split_is_per_author_disjoint_complete_and_repeatable(tmp_path):
    _authors(tmp_path / "src", {"a": 5, "b": 1})
    out = tmp_path / "out"
    counts = prereg.split_authors(str(tmp_path / "src"), str(out), authors=("a", "b"), fraction=0.1,
                                  chunk_bytes=512)
    files = {s: sorted(p.relative_to(out / s) for p in (out / s).rglob("*.txt")) for s in ("train", "dev")}
    assert not set(files["train"]) & set(files["dev"])
    # every author gives at least one chunk to dev, about 10% of its chunks
    per_author = {a: [p for p in files["dev"] if p.parts[0] == a] for a in ("a", "b")}
    n_a = sum(1 for p in files["train"] + files["dev"] if p.parts[0] == "a")
    assert len(per_author["a"]) == round(n_a * 0.1) and len(per_author["b"]) == 1
    # the chunks of a book, in order, are the book
    book = "".join((out / ("dev" if p in files["dev"] else "train") / p).read_text(encoding="utf-8")
                   for p in sorted(files["train"] + files["dev"]) if str(p).startswith("a/book0."))
    assert book == (tmp_path / "src" / "a" / "book0.txt").read_text(encoding="utf-8")
    assert counts["train"] + counts["dev"] == sum(p.stat().st_size for p in (tmp_path / "src").rglob("*.txt"))
    again = prereg.split_authors(str(tmp_path / "src"), str(out), authors=("a", "b"), fraction=0.1,
                                 chunk_bytes=512)
    assert again == counts
    assert sorted(p.relative_to(out / "dev") for p in (out / "dev").rglob("*.txt")) == files["dev"]


def test_a_missing_author_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="give --shared the directory that holds ru_text"):
        prereg.split_authors(str(tmp_path), str(tmp_path / "out"), authors=("nobody",))


def test_runs_set_the_arm_lr_seed_and_tokens():
    runs = prereg.stage_a_runs()
    assert len(runs) == len(prereg.ARMS) * len(prereg.LRS) and {r.seed for r in runs} == {0}
    vr = next(r for r in runs if r.arm == "none+value_residual" and r.lr == 6e-3)
    flags = dict(f.removeprefix("--config.").split("=", 1) for f in vr.overrides("D", "R"))
    assert flags["model.head_plan"] == "none" and flags["model.value_residual"] == "True"
    assert float(flags["optim.lr"]) == 6e-3 and flags["data.document_mask"] == "True"
    assert int(flags["max_steps"]) * int(flags["batch_size"]) * int(flags["model.block_size"]) >= 5_000_000
    kv = next(r for r in runs if r.arm.startswith("kv:"))
    assert dict(f.removeprefix("--config.").split("=", 1) for f in kv.overrides("D", "R"))[
        "model.head_plan"] == "kv:8,7,6,5,4,3"
    b = prereg.stage_b_runs({"all": 3e-3, "none": 6e-3})
    assert [(r.arm, r.seed) for r in b[:3]] == [("none", 0), ("all", 0), ("none", 1)]
    assert all(r.steps * prereg.BATCH * prereg.BLOCK >= 10_000_000 for r in b)
    assert len({(r.stage, r.name) for r in runs + b}) == len(runs) + len(b)  # runs/<stage>/<name>


def test_stage_d_trains_on_recall_rows_that_fit_its_context_with_every_answer_in_the_loss():
    """A stage D run's flags load into the study config as a kv_recall run (8 pairs, every one asked,
    loss on the answers, no text directory), at context 512 and >= 10 M tokens; its rows fit the
    window; it shares its name with the stage B run of the same arm, lr and seed, and its files
    live apart under its own stage."""
    from reflex_jax.data.tasks import get_task
    from reflex_jax.run_config import load_config, split_overrides
    d = prereg.stage_d_runs({"all": 6e-3, "kv:8,7,6,5,4,3": 3e-3})
    assert [(r.arm, r.seed) for r in d[:3]] == [("all", 0), ("kv:8,7,6,5,4,3", 0), ("all", 1)]
    assert len(d) == 2 * len(prereg.SEEDS_D)
    run = d[1]
    flags = run.overrides("DATA", "RUN")
    assert not any(f.startswith("--config.data.dir=") for f in flags)
    c = load_config(os.path.join(ROOT, "configs", "study.py"), split_overrides(flags))
    assert c.data.task == "kv_recall" and c.data.loss_on == "answer" and c.data.document_mask
    assert (c.data.task_options.n_pairs, c.data.task_options.queries) == (8, 8)
    assert c.model.head_plan == "kv:8,7,6,5,4,3" and c.optim.lr == 3e-3 and c.model.block_size == 512
    assert c.max_steps * c.batch_size * c.model.block_size >= 10_000_000
    rows = get_task("kv_recall").rows(50, 0, n_pairs=8, queries=8)
    assert max(len((r["question"] + r["answer"]).encode()) for r in rows) < 512 - 64  # + template
    assert len(rows[0]["answer_spans"]) == 8
    assert run.name == prereg.Run("B", run.arm, run.lr, run.seed).name and run.stage != "B"


def test_paired_interval_by_hand():
    r = prereg.paired_interval([-0.03, -0.01, -0.02])
    # mean -0.02, sd 0.01, se 0.01/sqrt(3); t(0.975, 2) = 4.302653
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert r["mean"] == pytest.approx(-0.02)
    assert r["ci95"] == pytest.approx([-0.02 - half, -0.02 + half], abs=1e-6)
    # t = 2 * sqrt(3) = 3.4641 on 2 df: p = 0.0742
    assert r["p"] == pytest.approx(0.0742, abs=5e-4)


def test_holm_by_hand():
    adj = prereg.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted a 0.01 x3 = 0.03; c 0.03 x2 = 0.06; b 0.04 x1 = 0.04 -> kept monotone at 0.06
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert prereg.holm({"a": 0.5, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})


def _contrast(diffs_by_arm):
    base = {s: 1.0 for s in range(5)}
    bpb = {"all": base}
    for arm, diffs in diffs_by_arm.items():
        bpb[arm] = {s: 1.0 - d for s, d in enumerate(diffs)}
    return prereg.contrasts(bpb, "all", list(diffs_by_arm))


CLEAR = [-0.030, -0.032, -0.028, -0.031, -0.029]


def test_verdict_helps_only_when_every_clause_holds():
    word, reasons = prereg.verdict(_contrast({"none": CLEAR, "kv:8,7,6,5,4,3": CLEAR,
                                              "none+value_residual": [0.0, 0.002, -0.002, 0.001, 0.0]}))
    assert word == "helps", reasons
    # the same gain, but ResFormer with the full cache is better by more than 0.01
    word, reasons = prereg.verdict(_contrast({"none": CLEAR, "kv:8,7,6,5,4,3": CLEAR,
                                              "none+value_residual": [0.02, 0.021, 0.019, 0.02, 0.02]}))
    assert word == "not shown" and "not within" in reasons[2]
    # significant but smaller than 0.01 bpb
    small = [-0.004, -0.0042, -0.0038, -0.0041, -0.0039]
    word, reasons = prereg.verdict(_contrast({"none": small, "kv:8,7,6,5,4,3": small,
                                              "none+value_residual": small}))
    assert word == "not shown" and "<" in reasons[1]
    # large but noisy: the interval crosses zero
    word, _ = prereg.verdict(_contrast({"none": CLEAR, "kv:8,7,6,5,4,3": [-0.1, 0.08, -0.05, 0.04, -0.03],
                                        "none+value_residual": CLEAR}))
    assert word == "not shown"
    word, _ = prereg.verdict(_contrast({"none": CLEAR, "kv:8,7,6,5,4,3": [-c for c in CLEAR],
                                        "none+value_residual": CLEAR}))
    assert word == "hurts"
    assert prereg.verdict({})[0] == "not shown"


def _result(tmp, stage, arm, lr, seed, dev, test=None, curves=None):
    r = {"stage": stage, "arm": arm, "lr": lr, "seed": seed, "train_s": 1800.0, "eval_s": 0.0,
         "evals": {"dev": {"bpb": {"bpb": dev}}}}
    if test is not None:
        r["evals"]["test"] = {"bpb": {"bpb": test}, **(curves or {})}
    d = tmp / stage
    d.mkdir(exist_ok=True)
    (d / f"{prereg.Run(stage, arm, lr, seed).name}.json").write_text(json.dumps(r))


def test_report_chooses_lr_on_dev_and_pairs_test_by_seed(tmp_path):
    for arm in prereg.ARMS:
        for lr, dev in zip(prereg.LRS, (2.0, 1.9, 1.95)):
            _result(tmp_path, "A", arm, lr, 0, dev + (0.1 if arm == "none" and lr == 3e-3 else 0))
    _result(tmp_path, "A", "all", 3e-3, 1, 0.5)  # a seed other than 0 in stage A has no say
    results = load_results(str(tmp_path))
    assert results["chosen"]["none"] == 6e-3 and results["chosen"]["all"] == 3e-3
    for seed in range(3):
        _result(tmp_path, "B", "all", 3e-3, seed, 1.8, 1.70 + 0.001 * seed)
        _result(tmp_path, "B", "kv:8,7,6,5,4,3", 3e-3, seed, 1.8, 1.75 + 0.002 * seed)
    s = write_report(str(tmp_path))
    c = s["contrasts"]["kv:8,7,6,5,4,3"]
    assert c["per_seed"] == pytest.approx([-0.05, -0.051, -0.052]) and c["seeds"] == [0, 1, 2]
    md = (tmp_path / "report.md").read_text()
    assert "| `none` | 2.0000 | 2.0000 | 1.9500 | 0.006 |" in md
    assert "provisional" in md and s["core_hours"] == pytest.approx(18 * 0.5)
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == s["verdict"]


def test_a_stopped_driver_passes_the_stop_to_its_runs():
    """SIGTERM / Ctrl-C of the driver reaches each run in flight (train.py saves and stops on it)
    and starts no new one."""
    import signal
    import sys
    import threading
    import time

    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "prereg_study", os.path.join(root, "scripts", "prereg_study.py"))
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("rc", driver.call(
        [sys.executable, "-c", "import time; time.sleep(60)"])))
    t.start()
    while not driver.CHILDREN:
        time.sleep(0.05)
    t0 = time.time()
    driver._stop(signal.SIGTERM, None)
    t.join(30)
    assert got["rc"] == -signal.SIGTERM and time.time() - t0 < 10
    assert driver.call([sys.executable, "-c", "pass"]) == -signal.SIGTERM  # nothing new starts
    driver.STOP.clear()


def test_report_averages_each_evaluation_curve_over_seeds_and_plots_them(tmp_path):
    def curves(shift):
        return {"forgetting": {"distances": [{"distance": d, "remembered": r + shift}
                                             for d, r in ((0, -0.2), (8, 0.1), (64, 0.0))]},
                "position": {"buckets": [{"start": s, "bpb": b + shift} for s, b in ((0, 2.0), (128, 1.9))]},
                "passkey": {"depths": [{"depth": 0.0, "accuracy": shift}]}}
    for seed, shift in ((0, 0.0), (1, 0.1)):
        _result(tmp_path, "B", "all", 3e-3, seed, 1.8, 1.7, curves(shift))
        _result(tmp_path, "B", "none", 3e-3, seed, 1.8, 1.75, curves(2 * shift))
    s = write_report(str(tmp_path))
    f = s["curves"]["all"]["forgetting"]
    assert f["x"] == [0, 8, 64] and f["y"] == pytest.approx([-0.15, 0.15, 0.05]) and f["seeds"] == 2
    assert s["curves"]["none"]["position"]["y"] == pytest.approx([2.1, 2.0])
    assert "recall" not in s["curves"]["all"]  # not measured, not invented
    md = (tmp_path / "report.md").read_text()
    assert "| `all` | -0.1500 | +0.1500 | +0.0500 |" in md and "![forgetting](forgetting.png)" in md
    assert (tmp_path / "forgetting.png").stat().st_size > 1000 and (tmp_path / "position.png").exists()


def _recall_result(tmp, arm, seed, em8, by_distance):
    pairs = [{"n_pairs": 4, "exact_match": em8 + 0.2, "answer_loss": 0.5, "by_distance": []},
             {"n_pairs": 8, "exact_match": em8, "answer_loss": 1.0,
              "by_distance": [{"distance": d + 1, "exact_match": e} for d, e in enumerate(by_distance)]}]
    r = {"stage": "D", "arm": arm, "lr": 3e-3, "seed": seed, "train_s": 900.0, "eval_s": 0.0,
         "evals": {"recall": {"recall": {"pairs": pairs}}}}
    d = tmp / "D"
    d.mkdir(exist_ok=True)
    (d / f"{prereg.Run('D', arm, 3e-3, seed).name}.json").write_text(json.dumps(r))


def test_report_tables_stage_d_recall_by_pairs_and_distance_with_paired_contrasts(tmp_path):
    for seed, (a, k) in enumerate(((0.30, 0.10), (0.40, 0.15), (0.35, 0.05))):
        _recall_result(tmp_path, "all", seed, a, [a] * 8)
        _recall_result(tmp_path, "kv:8,7,6,5,4,3", seed, k, [k + 0.01 * d for d in range(8)])
    s = write_report(str(tmp_path))
    r = s["recall"]
    assert r["arms"]["all"]["pairs"] == [4, 8] and r["arms"]["all"]["seeds"] == 3
    assert r["arms"]["all"]["exact_match"] == pytest.approx([0.55, 0.35])
    assert r["arms"]["kv:8,7,6,5,4,3"]["exact_match_by_distance"][7] == pytest.approx(0.10 + 0.07)
    c = r["contrasts"]["kv:8,7,6,5,4,3"]
    assert c["per_seed"] == pytest.approx([0.20, 0.25, 0.30]) and c["mean"] == pytest.approx(0.25)
    assert c["ci95"][0] > 0 and s["runs"]["D"] == 6 and s["core_hours"] == pytest.approx(6 * 0.25)
    md = (tmp_path / "report.md").read_text()
    lo, hi = c["ci95"]
    assert "| `all` | 3 | 0.5500 | 0.3500 |" in md
    assert s["plots"] == ["recall_distance.png"] and "![recall_distance](recall_distance.png)" in md
    assert f"| `kv:8,7,6,5,4,3` | +0.2500 | [{lo:+.4f}, {hi:+.4f}] | +0.2000, +0.2500, +0.3000 |" in md


def test_cost_counts_each_arms_kv_heads_and_times_decoding_side_by_side(tmp_path):
    """KV bytes per token follow the K/V heads each arm computes (6 layers x 8 heads x 16 dims x
    K and V x 2 bytes for `none`; `all` and its GQA control compute 8+7+6+5+4+3 = 33 heads) and
    the value residual adds 2 params a later layer; decoding is timed for every arm in the same
    rounds, with ratios against `none` only; the report renders the measured cost JSON."""
    from reflex_lab.prereg_cost import decode_speed, static_costs
    from reflex_lab.prereg_report import COST_FILE
    st = static_costs()
    assert st["none"]["kv_bytes_per_token"] == 6 * 8 * 16 * 2 * 2 == 3072
    assert st["all"]["kv_bytes_per_token"] == st["kv:8,7,6,5,4,3"]["kv_bytes_per_token"] == 33 * 16 * 2 * 2
    assert st["all"]["params"] == st["kv:8,7,6,5,4,3"]["params"] < st["none"]["params"]
    assert st["none+value_residual"]["params"] == st["none"]["params"] + 2 * 5
    assert st["all"]["train_flops_per_token"] < st["none"]["train_flops_per_token"]
    rows = decode_speed(("none", "all"), batches=(2,), prompt=8, new_tokens=4, reps=3)
    (row,) = rows
    assert set(row["tok_s"]) == {"none", "all"} and set(row["time_vs_none"]) == {"all"}
    assert len(row["times_s"]["all"]) == 3 and all(v > 0 for v in row["tok_s"].values())
    r = row["time_vs_none"]["all"]
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1]
    for arm in prereg.ARMS[2:]:  # the table has a row per primary arm: the other two, made up
        row["tok_s"][arm], row["time_vs_none"][arm] = 1.0, r
    cost = {"date": "2026-12-07T00:00:00Z", "cpu": "a CPU", "jax": "0.0", "static": st, "decode": rows}
    (tmp_path / COST_FILE).write_text(json.dumps(cost))
    write_report(str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "## Cost" in md and "| `all` | 1,579,008 | 2,112 |" in md
