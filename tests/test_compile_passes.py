"""experiments/compile_time/passes.py: the TPU compiler's own account of a compile (stage
durations, bundle count, the slowest HLO passes), read from libtpu's log."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "compile_time", "passes.py")
_spec = importlib.util.spec_from_file_location("compile_passes", SCRIPT)
passes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(passes)

# lines in libtpu's format (from a real log, their tails cut), a pipeline with passes inside it
LOG = """\
I1207 18:30:54.987616 4293 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module \
jit_wrapped: simplification-1
I1207 18:30:54.987643 4293 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 750 us (750 us)
I1207 18:30:54.988186 4293 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 1.5 ms (1500 us)
I1207 18:30:54.988190 4293 hlo_pass_pipeline.cc:176] HLO pass: tpu_fusion time: 1.2 s (1203705 us)
I1207 18:30:54.988199 4293 hlo_pass_pipeline.cc:176] HLO pass: simplification-1 time: 1.21 s
I1207 18:30:58.690113 4293 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 3.702531927s
I1207 18:31:08.852118 4372 deepsea_compiler_base.cc:3931] BACKEND_PASSES stage duration: 8.85979067825s
I1207 18:31:10.435009 4372 deepsea_compiler_backend.cc:1773] final program bundle count: 121,266 note
I1207 18:31:10.629568 4372 deepsea_compiler_backend.cc:1488] CODE_GENERATION stage duration: 1.76074437325s
"""


def test_summary_counts_leaf_passes_once_and_reads_the_stages():
    s = passes.summarise(LOG)
    assert s["stages_s"] == {"HLO_PASSES": 3.7, "BACKEND_PASSES": 8.86, "CODE_GENERATION": 1.76}
    assert s["bundles"] == 121266
    # the pipeline's own line (the sum of its passes) is not counted again
    assert s["top_passes"] == [["tpu_fusion", 1.2, 1], ["algsimp", 0.0, 2]]
    assert s["hlo_passes_s"] == pytest.approx(1.2)  # 1.2 s + 2.25 ms, rounded
    assert s["span_s"] == pytest.approx(15.6)
    # the longest silence: after the HLO passes, until the backend's stage ends
    assert s["silences"][0][:2] == [pytest.approx(10.2), "deepsea_compiler_hlo_passes.cc:6241"]
    assert s["silences"][0][3] == "deepsea_compiler_base.cc:3931"


def test_mistakes_are_refused_in_one_sentence():
    done = subprocess.run([sys.executable, SCRIPT, "cpu"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "give a TPU target first" in done.stderr
    for log in (["--log"], ["--log="]):
        done = subprocess.run([sys.executable, SCRIPT, "v5p:2x2x1", *log], capture_output=True,
                              text=True)
        assert done.returncode == 2
        assert done.stderr == "passes.py: --log needs a file to write the log to.\n"


@pytest.mark.slow
def test_a_real_deviceless_compile_reports_its_stages(tmp_path):
    pytest.importorskip("libtpu")
    log = tmp_path / "libtpu.log"
    done = subprocess.run(
        [sys.executable, SCRIPT, "v5p:2x2x1", f"--log={log}", "--set", "mesh.fsdp=4",
         "--set", "model.n_layer=2",
         "--set", "model.n_embd=128", "--set", "model.block_size=128",
         "--set", "model.vocab_size=512", "--set", "batch_size=8"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"HLO_PASSES", "BACKEND_PASSES"} <= set(row["stages_s"])
    assert row["bundles"] > 0 and row["top_passes"] and row["compile_cpu_s"] > 0
    assert 0 < row["span_s"] <= row["compile_s"] + row["lower_s"] + 30 and row["silences"]
    # the compiler's stages happen inside measure.py's compile
    assert row["stages_s"]["HLO_PASSES"] + row["stages_s"]["BACKEND_PASSES"] <= row["compile_s"] + 1
    assert passes.summarise(log.read_text())["bundles"] == row["bundles"]  # --log=FILE kept the log
