"""scripts/gpu_check.py, the first run on a GPU, on the CPU: its --smoke run writes every section
(numbers, or the reason it skipped), its command-line mistakes are one sentence, and the pieces
that only a GPU reaches (the cuDNN variants, the datasheet peaks, the HLO reading) run here on
the CPU or on fakes."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    t0 = time.perf_counter()
    proc = _run("--smoke", "--json", str(out))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["sections"]) == set(gpu_check.SECTIONS)
    for name, sec in res["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec)
        assert sec["wall_s"] >= 0
        if sec["status"] == "skipped":
            assert sec["reason"].strip(), name
    s = res["sections"]
    # parity: CPU against CPU here, both dtypes within the tolerance
    assert s["parity"]["pass"] is True
    assert {"float32", "bfloat16"} <= set(s["parity"]["dtypes"])
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in s["parity"]["dtypes"].values())
    # no GPU here: no cuDNN, no datasheet peak
    assert s["cudnn"]["status"] == "skipped" and "not a GPU" in s["cudnn"]["reason"]
    assert s["mfu"]["status"] == "skipped" and "datasheet" in s["mfu"]["reason"]
    # train: both schedules measured with the project's program and FLOP count
    for schedule in ("all", "none"):
        row = s["train"]["rows"][schedule]
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["compile_s"] > 0
        assert row["flops_per_token"] > 0 and row["losses_finite"]
        assert row["attention_backend"] == "xla"
    assert s["train"]["batch"]["grad_accum"] == 2
    # memory: the compiled step against the dry run of the same config (the CPU has no allocator
    # statistics, which the section says)
    mem = s["memory"]
    assert mem["compiled_on_device"]["total"] > 0
    assert mem["predicted"]["train_step"]["total"] > 0
    assert mem["ratios"]["device_compiled_over_predicted_train_step"] == pytest.approx(1.0)
    assert "memory_stats" in mem["allocator_note"]
    # decode: ours, and HF on the same device or the reason it did not run
    dec = s["decode"]
    assert dec["rows"] and all(r["all_tok_s"] > 0 and r["vanilla_tok_s"] > 0 for r in dec["rows"])
    assert all(r.get("hf_tok_s", 0) > 0 for r in dec["rows"]) or dec["hf_skipped"].strip()
    # the record of where it ran
    assert res["versions"]["python"] and res["versions"]["jax"] and res["date_utc"]
    assert res["device"]["platform"] == "cpu"
    assert len(res["summary"]) == 1 + len(gpu_check.SECTIONS)
    assert "parity" in proc.stdout and "decode" in proc.stdout
    assert wall < 240, wall


def test_parity_section_alone(tmp_path):
    out = tmp_path / "parity.json"
    proc = _run("--smoke", "--sections", "parity", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["sections"]) == ["parity"]
    assert res["sections"]["parity"]["status"] == "ok"


def test_a_missing_ml_collections_is_named_in_the_sections_it_stops(tmp_path):
    """The GPU machine's image has no ml_collections: the sections that build the train step's
    program say so (with the install line) instead of raising."""
    out = tmp_path / "check.json"
    code = ("import runpy, sys; sys.modules['ml_collections'] = None; "
            f"sys.argv = [{SCRIPT!r}, '--smoke', '--sections', 'mfu,memory', '--json', {str(out)!r}]; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == ["train", "mfu", "memory"]
    for sec in sections.values():
        assert sec["status"] == "skipped"
        assert "ml_collections is not installed" in sec["reason"]
        assert "pip install ml-collections" in sec["reason"]


@pytest.mark.parametrize("args, words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--sections", "parity,gpus"], "'gpus'"),
    (["--sections", ","], "no section"),
    (["--json", "/no/such/folder/x.json"], "does not exist"),
    (["--budget_s", "0"], "--budget_s"),
])
def test_command_line_mistakes_are_one_sentence(args, words):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: "), proc.stderr
    assert words in lines[0]
    assert proc.stdout == ""


def test_the_full_sizes_refuse_a_machine_without_a_gpu(tmp_path):
    out = tmp_path / "check.json"
    proc = _run("--json", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("gpu_check.py: error: JAX found no GPU here"), proc.stderr
    assert "--smoke" in lines[-1]
    res = json.loads(out.read_text())
    assert res["error"] == "JAX found no GPU" and res["versions"]["jax"]


def test_mfu_and_memory_bring_the_train_section():
    args = gpu_check.parse_args(["--sections", "memory,mfu"])
    assert args.sections == ["train", "mfu", "memory"]


def test_datasheet_peaks_by_device_kind():
    def device(kind, platform="gpu"):
        return types.SimpleNamespace(device_kind=kind, platform=platform)
    assert gpu_check.datasheet_peak(device("NVIDIA H100 80GB HBM3"))[0] == 989.5e12
    assert gpu_check.datasheet_peak(device("NVIDIA H200"))[0] == 989.5e12
    assert gpu_check.datasheet_peak(device("NVIDIA H100 PCIe"))[0] == 756.5e12
    peak, why = gpu_check.datasheet_peak(device("NVIDIA A100-SXM4-40GB"))
    assert peak is None and "A100" in why and "no MFU" in why
    peak, why = gpu_check.datasheet_peak(device("cpu", "cpu"))
    assert peak is None and "CPU" in why


def test_reading_the_attention_kernel_from_hlo():
    hlo = ('%a = custom-call(), custom_call_target="__cudnn$fmhaSoftmax"\n'
           '%b = custom-call(), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
           '%c = custom-call(), custom_call_target="__cudnn$fmhaSoftmax"')
    assert gpu_check._backend_in(hlo) == "cudnn"
    assert gpu_check._cudnn_calls(hlo) == {"__cudnn$fmhaSoftmax": 2,
                                           "__cudnn$fmhaSoftmaxBackward": 1}
    assert gpu_check._backend_in("%d = dot(a, b)") == "xla"


@pytest.mark.slow
def test_cudnn_variants_on_the_cpu():
    """The cuDNN section's variants, run on the CPU: `cudnn` refuses in the project's sentence,
    `auto` and `xla` compile to XLA attention and agree, plain causal and with documents."""
    import jax
    out = gpu_check.attention_variants(gpu_check.SMOKE, jax.devices("cpu")[0])
    v = out["variants"]
    assert set(v) == {f"{a} {k}" for a in ("cudnn", "auto", "xla") for k in ("causal", "documents")}
    for kind in ("causal", "documents"):
        assert v[f"cudnn {kind}"]["backend"] == "refused"
        assert "needs an NVIDIA GPU" in v[f"cudnn {kind}"]["refusal"]
        assert v[f"auto {kind}"]["backend"] == v[f"xla {kind}"]["backend"] == "xla"
        assert v[f"auto {kind}"]["vs_xla"]["pass"] and v[f"auto {kind}"]["fwd_bwd_ms"] > 0
    assert out["cudnn_taken_by_auto"] == {"causal": False, "documents": False}
    assert out["status"] == "ok"
