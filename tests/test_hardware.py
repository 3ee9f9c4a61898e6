"""Deviceless targets: libtpu and the CUDA plugin build the devices of TPU slices and GPU hosts on
this CPU machine, programs compile for them, and every mistake is one sentence."""
import os
import subprocess
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import hardware
from reflex_jax.errors import ConfigError, UsageError

from marks import needs_cuda, needs_libtpu  # skips, naming the plugin

hardware.quiet_environment()  # before any test here starts libtpu (conftest already chose cpu)



def _compile_sum_of_matmul(devices):
    """Compile a batch-sharded matmul + sum for `devices`; the compiler's memory analysis."""
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x_BE = jax.ShapeDtypeStruct((8 * len(devices), 256), jnp.bfloat16, sharding=split)
    w_EF = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=whole)
    compiled = jax.jit(lambda x, w: jnp.sum(x @ w)).lower(x_BE, w_EF).compile()
    return compiled.memory_analysis()


@needs_libtpu
@pytest.mark.parametrize("name, n_devices, n_hosts, chip", [
    ("v5p:2x2x1", 4, 1, "v5p"), ("v5p:2x2x2", 8, 2, "v5p"),
    ("v4:2x2x1", 4, 1, "v4"),  # megacore: one device per chip, as JAX runs a v4
    ("v5e:2x4", 8, 2, "v5e"), ("v6e:2x4", 8, 2, "v6e")])
def test_tpu_topologies(name, n_devices, n_hosts, chip):
    t = hardware.resolve_target(name)
    assert (t.name, t.platform, t.chip, t.n_devices, t.n_hosts) == (
        name, "tpu", hardware.CHIPS[chip], n_devices, n_hosts)
    assert len(t.devices) == n_devices and {d.platform for d in t.devices} == {"tpu"}
    assert {d.device_kind for d in t.devices} == {t.chip.device_kind}
    hosts = len({d.process_index for d in t.devices})
    assert hosts == n_hosts == n_devices // t.chip.chips_per_host
    assert hardware.resolve_target(name) is t  # cached


@needs_cuda
@pytest.mark.parametrize("name, n_devices, n_hosts", [
    ("gpu:h100x8", 8, 1), ("gpu:h100x16", 16, 2), ("gpu:h200x8", 8, 1), ("gpu:h100x2", 2, 1)])
def test_gpu_hosts(name, n_devices, n_hosts):
    t = hardware.resolve_target(name)
    assert (t.platform, t.n_devices, t.n_hosts) == ("gpu", n_devices, n_hosts)
    assert {d.platform for d in t.devices} == {"gpu"}
    assert t.chip.name.upper() in t.devices[0].device_kind  # "NVIDIA H100 80GB HBM3"
    hosts = [d.process_index for d in t.devices]
    assert hosts == sorted(hosts)  # each host's GPUs together, as one 8-GPU node each


@needs_libtpu
@needs_cuda
def test_programs_compile_for_the_targets():
    for name in ("v5p:2x2x2", "gpu:h100x16"):
        memory = _compile_sum_of_matmul(hardware.resolve_target(name).devices)
        assert memory is not None and memory.argument_size_in_bytes > 0, name


def test_device_kind_chip():
    assert hardware.device_kind_chip("TPU v5 lite") is hardware.CHIPS["v5e"]
    assert hardware.device_kind_chip("NVIDIA H200") is hardware.CHIPS["h200"]
    assert hardware.device_kind_chip("NVIDIA H100 PCIe") is None  # other figures than the SXM part
    assert hardware.device_kind_chip(jax.devices("cpu")[0]) is None


def _one_sentence(error) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text and error.__cause__ is None, text
    return text


@pytest.mark.parametrize("name", ["v7:2x2", "gpu:a100x8", "v5p", "v5p:abc", "tpu"])
def test_unknown_target_lists_the_forms(name):
    with pytest.raises(UsageError) as e:
        hardware.resolve_target(name)
    text = _one_sentence(e.value)
    assert text.startswith(f"unknown compile target {name!r}") and "gpu:h100xN" in text
    assert "v5p:2x2x2" in text


@needs_libtpu
def test_topology_libtpu_rejects_says_what_libtpu_said():
    with pytest.raises(UsageError) as e:
        hardware.resolve_target("v5p:3x3x3")
    text = _one_sentence(e.value)
    assert text.startswith("libtpu rejects the TPU topology 'v5p:3x3x3': Topology layout")
    assert "not divisible" in text and "v5p:2x2x2" in text


def test_gpu_count_between_hosts_is_refused():
    with pytest.raises(UsageError) as e:
        hardware.resolve_target("gpu:h100x12")
    assert "12 GPUs" in _one_sentence(e.value)


def test_missing_plugins_give_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # what find_spec sees without the package
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)  # set by importing libtpu
    with pytest.raises(ConfigError) as e:
        hardware.resolve_target("v6e:4x4")
    assert _one_sentence(e.value).endswith(f'pip install "jax[tpu]=={jax.__version__}"')
    for cuda in ("cuda12", "cuda13"):
        monkeypatch.setitem(sys.modules, f"jax_plugins.xla_{cuda}", None)
    with pytest.raises(ConfigError) as e:
        hardware.resolve_target("gpu:h200x4")
    assert _one_sentence(e.value).endswith(f'pip install "jax[cuda12]=={jax.__version__}"')


@needs_cuda
@pytest.mark.parametrize("platforms, said", [("cuda", "is 'cuda'"), ("", "is unset")])
def test_gpu_targets_need_the_cpu_platform(platforms, said):
    before = jax.config.jax_platforms  # the backends already started: this changes no device
    jax.config.update("jax_platforms", platforms or None)
    try:
        with pytest.raises(ConfigError) as e:
            hardware.resolve_target("gpu:h200x1")
    finally:
        jax.config.update("jax_platforms", before)
    text = _one_sentence(e.value)
    assert f"JAX_PLATFORMS {said}" in text and "run with JAX_PLATFORMS=cpu" in text


@needs_libtpu
def test_version_mismatch_against_what_jax_pins():
    assert hardware.version_problem("libtpu", "tpu", metadata.version("libtpu")) is None
    text = hardware.version_problem("libtpu", "tpu", "0.0.1")
    assert text.startswith(f"libtpu 0.0.1 does not match jax {jax.__version__}, which needs libtpu")
    assert text.endswith(hardware.install_line("tpu"))


@needs_libtpu
@needs_cuda
def test_quiet_environment_leaves_nothing_on_stderr():
    """A fresh process with nothing set: quiet_environment(), then both kinds of target resolve
    and compile without one line from libtpu or the CUDA plugin."""
    env = {k: v for k, v in os.environ.items()
           if k != "JAX_PLATFORMS" and k not in hardware._QUIET_TPU}
    probe = ("from reflex_jax import hardware\n"
             "hardware.quiet_environment()\n"
             "import jax, numpy as np\n"
             "for name in ('v5p:2x2x2', 'gpu:h100x8'):\n"
             "    mesh = jax.sharding.Mesh(np.array(hardware.resolve_target(name).devices), 'd')\n"
             "    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))\n"
             "    x = jax.ShapeDtypeStruct((64, 128), 'bfloat16', sharding=s)\n"
             "    print(jax.jit(lambda x: (x @ x.T).sum()).lower(x).compile() is not None)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stderr
    assert out.stderr == ""


# ---- issue #32: platforms the machine lacks, a missing plugin, start-up noise -------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_accelerator = pytest.mark.skipif(hardware.accelerator_visible(),
                                    reason="this machine has an accelerator")


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
    from reflex_jax import ModelConfig, init_params, save_params
    cfg = ModelConfig(vocab_size=259, block_size=16, n_layer=1, n_head=2, n_embd=16)
    path = str(tmp_path_factory.mktemp("params"))
    save_params(path, cfg, init_params(cfg, jax.random.PRNGKey(0)), meta={"tokenizer": "bytes"})
    return path


def _script(args, env, tmp_path, timeout=300):
    """A CLI in a fresh process (no malloc restart), from tmp_path; (status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=timeout, env={**env, "REFLEX_TUNE_MALLOC": "0",
                                                "PYTHONPATH": ROOT})
    return proc.returncode, proc.stdout, proc.stderr


def _env_without_platform():
    return {k: v for k, v in os.environ.items()
            if k != "JAX_PLATFORMS" and k not in hardware._QUIET_TPU}


@pytest.mark.slow
@no_accelerator
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_platform_the_machine_lacks_is_one_sentence(platform, params_dir, tmp_path):
    """JAX_PLATFORMS=tpu: a RuntimeError traceback; =cuda: a logged plugin traceback, then a bare
    AssertionError from jax's backends() (44 lines). Now one line from train.py and sample.py."""
    env = {**_env_without_platform(), "JAX_PLATFORMS": platform}
    runs = [[os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
             "--config.batch_size=8", "--config.max_steps=2", f"--config.run_dir={tmp_path}/run"],
            [os.path.join(ROOT, "sample.py"), "--run", params_dir, "--prompt_tokens", "1,2",
             "--max_new_tokens", "2"]]
    for args in runs:
        status, _, err = _script(args, env, tmp_path)
        prog = os.path.basename(args[0])
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"{prog}: error: JAX_PLATFORMS={platform} asks for the {platform} "
                              "platform, which JAX cannot start on this machine ("), err
        assert "; unset JAX_PLATFORMS to use the devices found here, or run where a " in err


BLOCK_CUDA_PLUGIN = """
import sys
class _NoJaxPlugins:  # as if no JAX plugin were installed
    def find_spec(self, name, path=None, target=None):
        if name == "jax_plugins" or name.startswith("jax_plugins."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoJaxPlugins())
"""


@pytest.mark.slow
def test_compile_for_gpu_without_the_cuda_plugin_says_the_pip_line(tmp_path):
    """The plugin made unimportable in a real process (a sitecustomize that blocks jax_plugins):
    train.py --compile_for and reflex_lab.fit end in docs/accelerators.md's install line."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_CUDA_PLUGIN)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    pip = f'install it with: pip install "jax[cuda12]=={jax.__version__}"'
    for prog, args in [("train.py", [os.path.join(ROOT, "train.py"), "--config",
                                     os.path.join(ROOT, "configs", "tiny.py"),
                                     "--compile_for=gpu:h100x8"]),
                       ("reflex_lab.fit", ["-m", "reflex_lab.fit", "--config",
                                           os.path.join(ROOT, "configs", "tiny.py"), "--target",
                                           "gpu:h100x8"])]:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300, env={**env, "REFLEX_TUNE_MALLOC": "0"})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (f"{prog}: error: the JAX CUDA plugin is not installed, so "
                                       f"there is no compiler for GPU targets; {pip}")


@needs_libtpu
@needs_cuda
@no_accelerator
def test_cli_commands_on_a_cpu_machine_print_no_plugin_noise(params_dir, tmp_path):
    """With both plugins installed and JAX_PLATFORMS unset, JAX's start printed ~15 lines (CUDA
    cuInit, libtpu) in every command; the CLIs now start on the CPU directly."""
    env = _env_without_platform()
    for args in ([os.path.join(ROOT, "sample.py"), "--run", params_dir, "--prompt_tokens", "1,2",
                  "--max_new_tokens", "2", "--print_tokens"],
                 [os.path.join(ROOT, "convert_weights.py"), "--export", "hf", "--run", params_dir,
                  "--out", str(tmp_path / "hf")]):
        status, out, err = _script(args, env, tmp_path)
        assert status == 0, err
        assert not [line for line in err.splitlines()
                    if any(w in line for w in ("cuInit", "libtpu", "TPU", "CUDA"))], err
    # a platform the user asked for is left alone: JAX still says what it could not start
    status, _, err = _script([os.path.join(ROOT, "sample.py"), "--run", params_dir,
                              "--prompt_tokens", "1", "--max_new_tokens", "1"],
                             {**env, "JAX_PLATFORMS": "cuda"}, tmp_path)
    assert status == 2 and "cuInit" in err
