"""bench.py: the PyTorch peer is the same architecture (same weights -> same loss), the KV-cache
report follows the schedule exactly, the ablation selects its kernels explicitly, and a tiny bench
run yields the JSON with every headline ratio. No timing is asserted (timings are not stable on a
shared machine)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax.kernels.cross_entropy import token_cross_entropy
from reflex_jax.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("reflex,norm,mlp", [("all", "rmsnorm", "swiglu"), ("none", "layernorm", "gelu")])
def test_torch_peer_is_the_same_model(reflex, norm, mlp):
    torch = pytest.importorskip("torch")
    from reflex_jax.model import Decoder, head_matrix, init_params
    from reflex_lab.bench import torch_peer
    cfg = ModelConfig(vocab_size=71, block_size=12, n_layer=4, n_head=4, n_embd=32, head_plan=reflex,
                      norm=norm, mlp=mlp)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(3)))
    tokens = np.random.default_rng(0).integers(0, 71, (2, 13))
    h = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens[:, :-1]), return_hidden=True)
    want = float(jnp.mean(token_cross_entropy(h, head_matrix(cfg, params), jnp.asarray(tokens[:, 1:]))))
    model = torch_peer.TorchGPT(cfg)
    model.load_state_dict(torch_peer.torch_state_from_jax(cfg, params), strict=True)
    t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        got = float(model(t[:, :-1], t[:, 1:]))
    assert abs(got - want) < 1e-4, (got, want)


def test_kv_cache_bytes_follow_the_schedule_exactly():
    from reflex_lab.bench.report import kv_cache_report
    from reflex_lab.bench.settings import BenchSettings
    s = BenchSettings.preset("smoke")
    kv = kv_cache_report(s)
    cfg = ModelConfig(**s.model_fields("all", "float32"))
    assert kv["exact"] and kv["all"]["kv_heads"] == sum(p.n_self for p in cfg.layers)
    assert kv["all"]["bytes"] * cfg.n_layer * cfg.n_head == kv["none"]["bytes"] * cfg.kv_heads_total


def test_ablation_switches_one_kernel_on_per_step():
    """From all kernels off to the default choices, one more switch on at every step."""
    from reflex_jax.kernels import SWITCHES as switches, KernelChoices
    from reflex_lab.bench.ablation import ABLATION_STEPS
    on = [sum(getattr(k, n) for n in switches) for _, k in ABLATION_STEPS]
    assert on == list(range(len(switches) + 1))
    assert ABLATION_STEPS[-1][1] == KernelChoices()
    for (_, a), (_, b) in zip(ABLATION_STEPS, ABLATION_STEPS[1:]):
        assert all(getattr(b, n) >= getattr(a, n) for n in switches)


def test_bench_flags_mistakes_are_usage_errors(capsys):
    from reflex_lab.bench import cli
    for argv in (["--smoke", "--dtypes", "float16"], ["--smoke", "--prompts", "a,b"],
                 ["--smoke", "--reps", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "bench.py: error: --" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_smoke_run_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| train step |" in proc.stdout and "| ratio |" in proc.stdout
    res = json.loads(out.read_text())
    r = res["ratios"]
    for key in ("train_vs_torch_compile", "train_vs_torch_eager", "reflex_vs_vanilla_step_time",
                "decode_cached_vs_recompute_512", "kv_bytes_reflex_vs_vanilla", "mfu"):
        assert key in r, key
    assert 0 < r["mfu"] and r["reflex_vs_vanilla_step_time"] > 0 and r["decode_cached_vs_recompute_512"] > 0
    assert r["kv_bytes_exact"] is True and r["kv_bytes_reflex_vs_vanilla"] == pytest.approx(7 / 8)
    for key in ("reflex_vs_vanilla_step_time", "document_mask_step_time"):  # one rep: no interval
        assert f"{key}_ci95" in r and r[f"{key}_ci95"] is None
    a, b = (res["train"][f"jax {x} float32"]["step_s_all"] for x in ("all", "none"))
    assert r["reflex_vs_vanilla_step_time"] == pytest.approx(a[0] / b[0])
    assert {"jax all float32", "jax none float32", "jax all docs float32"} <= set(res["train"])
    assert res["train"]["jax all docs float32"]["document_mask"] and r["document_mask_step_time"] > 0
    if res["env"].get("torch"):
        assert r["train_vs_torch_eager"] > 0
        parity = res["train_parity"]["float32"]
        assert parity["max_abs_diff"] < 1e-3, parity  # same weights, same batch, same model
        assert res["generation"]["rows"][0]["hf_greedy_token_agreement"] >= 0.5
    for row in res["train"].values():
        assert row["step_s"] > 0 and np.isfinite(row["loss_last"])
    if res["env"]["cpu_generation"]:  # x86 Linux: the header names the CPU generation too
        assert f"{res['env']['cpu']} ({res['env']['cpu_generation']})" in proc.stdout


def test_cpu_generation_reads_family_model_and_stepping():
    from reflex_lab import machine
    try:
        info = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}
    if "cpu family" not in fields:
        pytest.skip("this CPU's /proc/cpuinfo has no family")
    assert machine.cpu_generation() == (f"family {fields['cpu family']}, model {fields['model']}, "
                                        f"stepping {fields['stepping']}")
    assert machine.cpu_model() == fields["model name"]  # not the 'model' line above it


@pytest.mark.slow
def test_profile_budget_adds_up_and_counts_every_matmul_flop():
    """The budget's categories add up to the step, and its matmul FLOPs (parsed from the compiled
    HLO for JAX, from the profiled shapes for PyTorch) are the model's analytic count, site by site."""
    pytest.importorskip("torch")
    from reflex_jax.train import flops
    from reflex_lab.bench import budget, profile
    from reflex_lab.bench.settings import BenchSettings
    s = BenchSettings.preset("smoke")
    res = profile.profile(s, log=lambda m: None)
    jax_b, torch_b = res["budgets"]["jax all float32"], res["budgets"]["torch eager all float32"]
    cfg = ModelConfig(**s.model_fields("all", "float32"))
    tokens = s.batch * s.block_size
    for b in (jax_b, torch_b):
        cats = [r["category"] for r in b["rows"]]
        assert cats == list(budget.CATEGORIES) + [budget.UNACCOUNTED]
        assert sum(r["seconds"] for r in b["rows"]) == pytest.approx(b["wall_s"])
        assert all(r["seconds"] >= 0 for r in b["rows"][:-1])
    gflop = {b_name: {r["category"]: r["gflop"] for r in b["rows"]}
             for b_name, b in (("jax", jax_b), ("torch", torch_b))}
    assert sum(gflop["jax"].values()) * 1e9 == pytest.approx(
        flops.train_flops_per_token(cfg, s.block_size) * tokens, rel=1e-6)
    E, F, V = cfg.n_embd, cfg.hidden, cfg.vocab_size
    assert gflop["jax"]["matmul MLP"] * 1e9 == pytest.approx(cfg.n_layer * 6 * 3 * E * F * tokens)
    assert gflop["jax"]["matmul LM head + loss"] * 1e9 == pytest.approx(6 * E * V * tokens)
    for site in ("matmul q/k/v/o", "matmul MLP", "matmul LM head + loss"):
        assert gflop["torch"][site] == pytest.approx(gflop["jax"][site]), site
    assert "| matmul MLP |" in profile.markdown(res)
    split = res["wall_split"]["float32"]
    # the smoke preset skips torch.compile
    assert set(split) == {"jax all", "jax none", "torch eager all"}
    for sp in split.values():
        assert sum(sp["parts"].values()) == pytest.approx(sp["step_s"])
        assert sp["parts"]["decoder fwd+bwd"] == sp["decoder_s"] > 0
        assert len(sp["per_round"]["decoder"]) == s.train_reps
    assert "| LM head + loss |" in profile.markdown(res)
    # all over none (not the other way), round by round: the step's and the decoder's
    from reflex_lab.bench.stats import trimmed_log_interval
    rv = res["reflex_vs_vanilla"]["float32"]
    step_all, step_none = (res["budgets"][f"jax {p} float32"]["step_s_all"] for p in ("all", "none"))
    assert rv["step"]["ratio"] == pytest.approx(trimmed_log_interval(
        np.log(np.divide(step_all, step_none)))[0])
    dec_all, dec_none = (split[f"jax {p}"]["per_round"]["decoder"] for p in ("all", "none"))
    assert rv["decoder"]["ratio"] == pytest.approx(trimmed_log_interval(
        np.log(np.divide(dec_all, dec_none)))[0])
    assert "`all` / `none`, float32, paired [95%]: step " in profile.markdown(res)


@pytest.mark.slow
def test_wall_split_calls_compute_the_step_loss_and_the_decoder_alone(tmp_path):
    """The split's 'gradients' call is the train step's loss and gradient without the update (same
    loss as the first step, params unchanged); its 'decoder' call has no LM head or loss in it."""
    pytest.importorskip("torch")
    from reflex_lab.bench import wall_split
    from reflex_lab.bench.settings import BenchSettings
    from reflex_lab.bench.train import JaxTrain
    from reflex_lab.bench.torch_peer import TorchTrain
    s = BenchSettings.preset("smoke")
    tokens = np.random.default_rng(0).integers(0, s.vocab_size, (s.batch, s.block_size + 1))
    j = JaxTrain(s, "all", "float32", tokens.astype(np.int32))
    t = TorchTrain(j.cfg, j.init_params, tokens, "float32", compiled=False)
    jc, tc = wall_split.calls_of(j), wall_split.calls_of(t)
    grad_losses = (jc["gradients"](), jc["gradients"](), tc["gradients"]())
    dec_losses = (jc["decoder"](), tc["decoder"]())
    first = (j.step(), t.step())
    np.testing.assert_allclose(grad_losses, [first[0], first[0], first[1]], rtol=1e-5)
    np.testing.assert_allclose(dec_losses[0], dec_losses[1], rtol=1e-4)   # same projection
    assert abs(dec_losses[0] - first[0]) > 1e-3


def test_paired_ratio_interval():
    """The ratio of paired reps is the 20% trimmed mean of the log per-round ratios, and its 95%
    interval Yuen's trimmed t interval (here computed by hand from the definition: winsorized
    variance, n - 2g - 1 degrees of freedom); below 5 rounds it is the plain t interval on the
    logs. One slow round moves the geometric mean, not the trimmed estimate. The interval contains
    the estimate, narrows with more rounds of the same spread, and is exactly the ratio when every
    round agrees."""
    from scipy.stats import t

    from reflex_lab.bench.stats import fmt_ratio, half_width, paired_ratio
    a, b = [1.10, 0.95, 1.02, 1.00], [1.0, 1.0, 1.0, 1.0]
    r = paired_ratio(a, b)
    logs = np.log(np.array(a))
    half = t.ppf(0.975, 3) * logs.std(ddof=1) / 2
    assert r["ratio"] == pytest.approx(np.exp(logs.mean()))
    assert r["ci95"] == pytest.approx([np.exp(logs.mean() - half), np.exp(logs.mean() + half)])
    assert r["ci95"][0] < r["ratio"] < r["ci95"][1] and r["n"] == 4

    rounds = [1.00, 1.02, 0.99, 1.01, 2.60, 1.03, 0.98, 1.00]  # one round slowed 2.6x (8 rounds: g = 1)
    slow = paired_ratio(rounds, [1.0] * 8)
    x = np.sort(np.log(rounds))
    kept = x[1:7]
    w = np.concatenate([[x[1]], x[1:7], [x[6]]])  # winsorized
    se = w.std(ddof=1) / ((1 - 2 / 8) * np.sqrt(8))
    half = t.ppf(0.975, 8 - 2 - 1) * se
    assert slow["ratio"] == pytest.approx(np.exp(kept.mean()))
    assert slow["ci95"] == pytest.approx([np.exp(kept.mean() - half), np.exp(kept.mean() + half)])
    assert abs(slow["ratio"] - 1.0) < 0.01 and np.exp(np.log(rounds).mean()) > 1.1
    assert slow["ci95"][1] < 1.05

    wider = half_width(r["ci95"], r["ratio"])
    assert half_width(paired_ratio(a * 8, b * 8)["ci95"], r["ratio"]) < wider / 2
    same = paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # drift between rounds cancels
    assert same["ratio"] == pytest.approx(2.0) and same["ci95"] == pytest.approx([2.0, 2.0])
    assert paired_ratio([1.0], [2.0])["ci95"] is None
    assert fmt_ratio(r) == f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
    with pytest.raises(ValueError, match="as many reps"):
        paired_ratio([1.0, 2.0], [1.0])


def _bench_json(ratio: float, reps=5, **settings) -> dict:
    """A bench.py JSON whose `jax all` steps take `ratio` times `jax none`'s in every round."""
    base = [1.0 + 0.01 * i for i in range(reps)]
    return {"settings": {"dtypes": ["float32"], "n_layer": 6, "train_reps": reps, **settings},
            "train": {"jax all float32": {"step_s_all": [ratio * t for t in base]},
                      "jax none float32": {"step_s_all": base}}}


def test_ratios_across_runs_are_one_sample_per_run(tmp_path):
    """Each run gives its own ratio; across runs, their geometric mean with a t interval over runs
    (by hand here). Runs of other settings are refused in one sentence naming the setting."""
    from scipy.stats import t

    from reflex_jax.errors import UsageError
    from reflex_lab.bench.across_runs import across_runs, main
    runs = [_bench_json(r) for r in (1.00, 1.10, 0.95)]
    runs[1]["settings"]["train_reps"] = 8  # more reps measure the same thing
    runs[2]["settings"]["gen"] = True      # generation runs after the train steps are timed
    out = across_runs(runs)["ratios"]["reflex_vs_vanilla_step_time float32"]
    logs = np.log([1.00, 1.10, 0.95])
    half = t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    assert out["per_run"] == pytest.approx([1.00, 1.10, 0.95]) and out["n"] == 3
    assert out["ratio"] == pytest.approx(np.exp(logs.mean()))
    assert out["ci95"] == pytest.approx([np.exp(logs.mean() - half), np.exp(logs.mean() + half)])
    assert out["per_run_ci95"][0] == pytest.approx([1.0, 1.0])  # each run alone: no spread at all
    with pytest.raises(UsageError, match=r"other settings than run 1 \(n_layer\)"):
        across_runs([_bench_json(1.0), _bench_json(1.0, n_layer=12)])
    with pytest.raises(UsageError, match=r"other settings than run 1 \(torch\)"):
        across_runs([_bench_json(1.0), _bench_json(1.0, torch=False)])
    with pytest.raises(UsageError, match="at least two"):
        across_runs([_bench_json(1.0)])
    paths = []
    for i, r in enumerate(runs):
        paths.append(str(tmp_path / f"r{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UsageError, match="is not a bench.py --json file"):
        main(paths[:1] + [str(tmp_path / "other.json")])
    main(paths + ["--json", str(tmp_path / "all.json")])
    saved = json.loads((tmp_path / "all.json").read_text())
    assert saved["runs"] == ["r0.json", "r1.json", "r2.json"]


def test_between_run_spread_is_what_within_run_errors_do_not_explain():
    """Cochran's Q, I^2 and the DerSimonian-Laird tau by hand: two runs 0.1 apart in log ratio
    with within-run standard errors of 0.01 are far more apart than those errors allow (tau 0.07);
    three runs within their errors leave no between-run spread. The chance that two runs agree
    within +-3% is 0.95 exactly when their log difference's sd is log(1.03) / 1.96, and it stays
    below 1 with tau > 0 however small the within-run errors get. A run without a within-run
    error (every round the same ratio) gives no heterogeneity, and the table says so."""
    from scipy.stats import chi2

    from reflex_lab.bench.across_runs import across_runs, agree_within, heterogeneity, heterogeneity_table
    h = heterogeneity([0.0, 0.1], [0.01, 0.01])
    assert h["q"] == pytest.approx(50.0) and h["p"] == pytest.approx(chi2.sf(50.0, 1))
    assert h["i2"] == pytest.approx(49 / 50) and h["tau"] == pytest.approx(0.07)
    assert h["within_se"] == pytest.approx(0.01)
    calm = heterogeneity([0.0, 0.005, -0.005], [0.01, 0.01, 0.01])
    assert calm["q"] == pytest.approx(0.5) and calm["tau"] == 0.0 and calm["i2"] == 0.0
    assert heterogeneity([0.0, 0.1], [0.01, None]) is None

    sd_95 = np.log(1.03) / 1.959964
    assert agree_within(0.0, sd_95 / np.sqrt(2), 0.03) == pytest.approx(0.95, abs=1e-6)
    assert agree_within(sd_95 / np.sqrt(2), 0.0, 0.03) == pytest.approx(0.95, abs=1e-6)
    assert agree_within(0.02, 1e-9, 0.03) < 0.8 and agree_within(0.0, 0.0, 0.03) == 1.0

    noisy = []
    for shift in (1.0, 1.1):
        run = _bench_json(1.0, reps=6)
        run["train"]["jax all float32"]["step_s_all"] = [
            shift * t * (1 + e) for t, e in zip(run["train"]["jax none float32"]["step_s_all"],
                                                (0.01, -0.01, 0.02, -0.02, 0.0, 0.01))]
        noisy.append(run)
    result = across_runs(noisy)
    h = result["ratios"]["reflex_vs_vanilla_step_time float32"]["heterogeneity"]
    assert h["p"] < 0.01 and h["tau"] > 0.05
    assert "| reflex_vs_vanilla_step_time float32 |" in heterogeneity_table(result)
    flat = across_runs([_bench_json(1.0), _bench_json(1.1)])
    assert flat["ratios"]["reflex_vs_vanilla_step_time float32"]["heterogeneity"] is None
    assert "| – | – | – | – | – | – |" in heterogeneity_table(flat)


def test_calls_that_grow_the_heap_are_counted_and_left_out_of_ratios():
    """A call that raises the process's peak memory (here: a new, larger array each call) is seen,
    a steady call is not; rounds where either side grew the heap leave the paired ratio and the
    step time's median, and are counted as dropped."""
    import itertools

    from reflex_lab.bench.stats import paired_ratio
    from reflex_lab.bench.timing import HEAP_GROWTH_BYTES, interleaved, steady_median, steady_pairs
    buf, size = np.ones(1 << 20), itertools.count(1)
    step = 2 * HEAP_GROWTH_BYTES // 8  # float64s: each array 2 x the threshold larger than the last
    calls = {"grow": lambda: np.ones(step * next(size)).sum(), "steady": lambda: buf.sum()}
    growth: dict = {}
    steal: dict = {}
    interleaved(calls, 3, warmup_rounds=1, growth=growth, steal=steal)
    assert [len(v) for v in steal.values()] == [3, 3] and min(min(v) for v in steal.values()) >= 0
    assert all(g > HEAP_GROWTH_BYTES for g in growth["grow"]), growth
    assert all(g <= HEAP_GROWTH_BYTES for g in growth["steady"]), growth
    assert steady_pairs(growth["steady"], growth["steady"]) == [True] * 3
    assert steady_pairs(growth["grow"], growth["steady"]) == [False] * 3
    assert steady_pairs(None, growth["steady"]) is None
    r = paired_ratio([1.0, 5.0, 1.1], [1.0, 1.0, 1.0], keep=[True, False, True])
    assert r["ratio"] == pytest.approx(1.1 ** 0.5) and r["n"] == 2 and r["dropped"] == 1
    assert paired_ratio([1.0, 5.0], [1.0, 1.0], keep=[False, False])["n"] == 2  # none steady: all count
    big = 2 * HEAP_GROWTH_BYTES
    assert steady_median([1.0, 9.0, 1.2, 1.1], [0, big, 0, 0]) == pytest.approx(1.1)
    assert steady_median([9.0, 8.0], [big, big]) == pytest.approx(8.5)
