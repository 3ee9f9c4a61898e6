"""`train.py --dry_run --compile_for=TARGET`: the train step, eval step, prefill and decode step of
a small reflex model compile deviceless for TPU slices (one host and two hosts, fsdp and tensor
parallel, an uneven schedule) and GPU hosts; the report's figures are the compiler's; a model
that does not fit says so with exit status 3; mistakes are one sentence."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from reflex_jax import hardware
from reflex_jax.cli import train as train_cli
from reflex_jax.run_config import load_config
from reflex_jax.train.program import TrainProgram

from marks import HAVE_LIBTPU, needs_cuda, needs_libtpu  # skips, naming the plugin

hardware.quiet_environment()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

# small and uneven: 3 layers x 4 heads, `all` -> self heads 4, 3, 2 (tensor=2 cannot split 3)
MODEL = {"model.n_layer": 3, "model.n_head": 4, "model.n_embd": 64, "model.block_size": 64,
         "model.vocab_size": 512, "model.dtype": "bfloat16", "batch_size": 16}


def _config(**over):
    return load_config(TINY, [(k, str(v)) for k, v in {**MODEL, **over}.items()])


def _dry(tmp_path, target, capsys, **over):
    args = [f"--config.{k}={v}" for k, v in {**MODEL, **over}.items()]
    out = tmp_path / "dry.json"
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--config", TINY, f"--compile_for={target}", f"--dry_run_json={out}"]
                       + args)
    text = capsys.readouterr().out
    return exit_.value.code, text, (json.loads(out.read_text()) if out.exists() else None)


@needs_libtpu
@pytest.mark.parametrize("target, mesh, hosts", [
    ("v5p:2x2x1", {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}, 1),
    ("v5p:2x2x2", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, 2),
])
def test_every_function_compiles_for_tpu_slices(tmp_path, capsys, target, mesh, hosts):
    # layers unrolled: the compiler's cost counts a loop's body once (docs/accelerators.md), and
    # on a TPU `all`'s layers are otherwise one diagonal loop
    status, text, rep = _dry(tmp_path, target, capsys, **mesh, **{"model.scan_layers": "off"})
    assert status == 0, text
    assert rep["target"] == target and rep["device_kind"] == "TPU v5" and rep["n_hosts"] == hosts
    assert rep["mesh"] == {"data": mesh["mesh.data"], "fsdp": mesh["mesh.fsdp"],
                           "tensor": mesh["mesh.tensor"]}
    assert rep["fits"] is True and rep["hbm_bytes"] == hardware.CHIPS["v5p"].hbm_bytes
    assert set(rep["functions"]) == {"train_step", "eval_step", "prefill", "decode"}
    for name, f in rep["functions"].items():
        assert f["flops"] > 0 and f["memory"]["total"] > 0, name
    # per-device train FLOPs: the compiler's count is close to the model's 6N + attention count
    assert 0.7 < rep["flops_per_step"] / rep["model_flops_per_step"] < 1.6
    assert 0 < rep["roofline_mfu"] <= 1.0 and rep["roofline_step_s"] > 0
    assert f"over {rep['n_devices']} devices ({hosts} process" in text and "fits: needs" in text
    assert "not a measured run" in text


@needs_libtpu
def test_reported_memory_is_the_compilers(tmp_path):
    target = hardware.resolve_target("v5p:2x2x1")
    program = TrainProgram(_config(**{"mesh.fsdp": 4}), devices=target.devices)
    _, rep = program.dry_run(target)
    B, T = 16, 64
    sds = lambda dtype: jax.ShapeDtypeStruct((B, T + 1), dtype,  # noqa: E731
                                             sharding=program.batch_sharding)
    batch = {"tokens": sds(jnp.int32), "mask": sds(jnp.float32), "segment_ids": sds(jnp.int32),
             "positions": sds(jnp.int32)}  # data.document_mask is on by default
    mem = program.train_step.lower(program.abstract_state, batch).compile().memory_analysis()
    got = rep["per_device_bytes"]
    assert (got["temp"], got["arguments"], got["outputs"]) == (
        mem.temp_size_in_bytes, mem.argument_size_in_bytes, mem.output_size_in_bytes)
    assert got["total"] == (mem.argument_size_in_bytes + mem.output_size_in_bytes
                            - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    assert program.kernels.platform == "tpu"


@needs_libtpu
def test_a_model_too_big_for_the_chip_exits_3(tmp_path, capsys):
    # 4 chips of 16 GiB, data parallel (params replicated): a 262144 x 8192 float32 embedding is
    # 8 GiB of params per chip, 16 more for Adam
    status, text, rep = _dry(tmp_path, "v5e:2x2", capsys, **{
        "model.vocab_size": 262144, "model.n_embd": 8192, "model.n_head": 8, "model.n_layer": 1,
        "model.mlp_hidden": 64, "model.block_size": 16, "batch_size": 4})
    assert status == train_cli.DOES_NOT_FIT and rep["fits"] is False
    assert rep["peak_total_bytes"] > rep["hbm_bytes"]
    assert "does not fit: needs " in text and "the chip has 16.00 GiB" in text


def test_mistakes_are_one_sentence(capsys):
    for target, said in (("v9z:2x2", "unknown compile target 'v9z:2x2'; use a TPU topology"),
                         ("gpu:h100x12", "asks for 12 GPUs"),
                         ("v5p:3x3x3", "libtpu rejects the TPU topology 'v5p:3x3x3'" if HAVE_LIBTPU
                          else "libtpu is not installed, so there is no compiler for TPU targets")):
        with pytest.raises(SystemExit) as exit_:
            train_cli.main(["--config", TINY, f"--compile_for={target}"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("train.py: error: ") and said in err, err


@needs_cuda
def test_every_function_compiles_for_gpu_hosts(tmp_path, capsys):
    status, text, rep = _dry(tmp_path, "gpu:h100x16", capsys,
                             **{"mesh.data": 8, "mesh.fsdp": 2, "mesh.tensor": 1})
    assert status == 0, text
    assert rep["n_devices"] == 16 and rep["n_hosts"] == 2 and "H100" in rep["device_kind"]
    assert rep["fits"] is True and set(rep["functions"]) == {"train_step", "eval_step",
                                                              "prefill", "decode"}
    # the compiler reports no cost for a deviceless GPU: the roofline uses the model's FLOPs and
    # the stated bytes floor, labelled as such, instead of a vacuous 100%
    assert rep["functions"]["train_step"]["flops"] == 0 and rep["cost_source"].startswith("analytic")
    mem, pd = rep["functions"]["train_step"]["memory"], rep["per_device_bytes"]
    assert rep["bytes_per_step"] == 2 * (mem["temp"] + 2 * pd["params"] + pd["opt_state"])
    assert rep["flops_per_step"] == 0 and 0 < rep["roofline_mfu"] <= 1.0
    assert "[analytic (the compiler reports no cost for this target)" in text


@needs_libtpu
def test_each_program_says_when_it_starts_compiling(tmp_path, capsys):
    status, text, _ = _dry(tmp_path, "v5p:2x2x1", capsys, **{"mesh.fsdp": 4, "model.n_layer": 2})
    assert status == 0, text
    lines = text.splitlines()
    for name in ("train_step", "eval_step", "prefill", "decode"):
        start = lines.index(f"compiling {name} for v5p:2x2x1 (4 x TPU v5) ...")
        assert lines[start + 1].startswith(f"compiled {name} in "), lines[start:start + 2]
