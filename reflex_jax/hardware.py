"""Hardware targets to compile for without the hardware: deviceless JAX devices and chip figures.

`resolve_target("v5p:2x2x2")` gives the devices of a v5p slice of 8 chips on 2 hosts, made by
libtpu on this machine; `resolve_target("gpu:h100x16")` gives two 8-GPU H100 hosts, made by the
CUDA plugin from a description of the GPU. Programs compile for them
(`jax.jit(f).lower(...).compile()`) as they would on the hardware; nothing can run on them.
`CHIPS` holds each chip's datasheet figures (the dry run's memory verdict and roofline), and
`device_kind_chip` finds them for the real devices of a run.

A process that compiles for a target calls `quiet_environment()` before JAX starts its backends.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError, UsageError


@dataclass(frozen=True)
class Chip:
    """One accelerator chip as its vendor's datasheet states it (`source`)."""
    name: str
    platform: str          # "tpu" or "gpu"
    device_kind: str       # jax's Device.device_kind for this chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int
    hbm_bandwidth: float   # bytes/s
    chips_per_host: int    # chips one JAX process drives in a multi-host slice or cluster
    source: str
    other_kinds: tuple = ()  # further device_kind spellings of the same chip


GB, GiB = 10**9, 2**30

# TPU figures: the "System architecture" table of each generation's Cloud TPU page. Multi-host TPU
# slices run one process per 4-chip VM (the v5e/v6e datasheets' "chips per host 8" is the
# single-host 2x4 VM), which is also libtpu's default for deviceless topologies.
# GPU figures: NVIDIA's product pages list bf16 "with sparsity"; dense is half of it.
CHIPS = {c.name: c for c in (
    Chip("v4", "tpu", "TPU v4", 275e12, 32 * GiB, 1200 * GB, 4,
         "cloud.google.com/tpu/docs/v4: 275 teraflops bf16 per chip, HBM2 32 GiB, 1200 GBps"),
    Chip("v5e", "tpu", "TPU v5 lite", 197e12, 16 * GiB, 819 * GB, 4,
         "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16 per chip, HBM 16 GiB, 819 GBps",
         ("TPU v5e",)),
    Chip("v5p", "tpu", "TPU v5", 459e12, 95 * GiB, 2765 * GB, 4,
         "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16 per chip, HBM 95 GiB, 2765 GBps",
         ("TPU v5p",)),
    Chip("v6e", "tpu", "TPU v6 lite", 918e12, 32 * GB, 1638 * GB, 4,
         "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16 per chip, HBM 32 GB, 1638 GBps",
         ("TPU v6e",)),
    # GPU memory: the bytes a GPU reports to XLA (XLA's h100_sxm / h200 specs, also the compile
    # description below); the datasheets' "80GB" / "141GB" are those of binary units
    Chip("h100", "gpu", "NVIDIA H100 80GB HBM3", 1979e12 / 2, 84942979072, 3.35e12, 8,
         "nvidia.com/en-us/data-center/h100: H100 SXM BF16 Tensor Core 1,979 TFLOPS with "
         "sparsity (989.5 dense), 80GB HBM3, 3.35TB/s; memory 84,942,979,072 bytes as XLA's "
         "h100_sxm spec"),
    Chip("h200", "gpu", "NVIDIA H200 141GB HBM3e", 1979e12 / 2, 151397597184, 4.8e12, 8,
         "nvidia.com/en-us/data-center/h200: H200 SXM BF16 Tensor Core 1,979 TFLOPS with "
         "sparsity (989.5 dense), 141GB HBM3e, 4.8TB/s; memory 151,397,597,184 bytes as XLA's "
         "h200 spec", ("NVIDIA H200",)),
)}

# v4 and v5p run with both TensorCores of a chip as one device ("megacore"), as JAX does there
_TPU_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore"}
_TPU_EXAMPLE = {"v4": "v4:2x2x1", "v5e": "v5e:2x4", "v5p": "v5p:2x2x2", "v6e": "v6e:2x4"}

# GpuTargetConfigProto text: the fields of XLA's xla/backends/gpu/target_config/specs/
# h100_sxm.txtpb and h200.txtpb that this jaxlib parses; cuDNN 9.8 is the oldest jax[cuda12] allows.
_HOPPER_CONFIG = (
    "gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32 "
    "shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048 "
    "core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 "
    "block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800 "
    "clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448 "
    "cuda_compute_capability {{ major: 9 feature_extension: ACCELERATED_FEATURES }} "
    "registers_per_core_limit: 65536 registers_per_block_limit: 65536 }} platform_name: \"CUDA\" "
    "dnn_version_info {{ major: 9 minor: 8 }} device_description_str: \"{kind}\"")
_GPU_TARGET_CONFIG = {
    "h100": _HOPPER_CONFIG.format(bandwidth=3352320000000, memory=CHIPS["h100"].hbm_bytes,
                                  kind=CHIPS["h100"].device_kind),
    "h200": _HOPPER_CONFIG.format(bandwidth=4800000000000, memory=CHIPS["h200"].hbm_bytes,
                                  kind=CHIPS["h200"].device_kind),
}
GPUS_PER_HOST = 8

_TPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)(_twisted|_untwisted)?$")
_GPU_NAME = re.compile(r"^gpu:(h100|h200)x(\d+)$")
FORMS = ("a TPU topology <generation>:<shape> with generation v4, v5e, v5p or v6e "
         "(v4:2x2x1, v5e:2x4, v5p:2x2x2, v6e:2x4, ...) or gpu:h100xN / gpu:h200xN "
         f"(N up to {GPUS_PER_HOST}, or a multiple of {GPUS_PER_HOST} for several hosts)")


@dataclass(frozen=True)
class Target:
    """A target's deviceless devices, in the order JAX gives them."""
    name: str
    platform: str
    chip: Chip
    devices: tuple
    n_devices: int
    n_hosts: int  # distinct process_index among the devices


def device_kind_chip(device) -> Optional[Chip]:
    """The CHIPS entry of a device (or of a device_kind string); None for other chips."""
    kind = (device if isinstance(device, str) else device.device_kind).strip().lower()
    for chip in CHIPS.values():
        if kind in (k.lower() for k in (chip.device_kind, *chip.other_kinds)):
            return chip
    return None


# ---- the environment -----------------------------------------------------------------------------

# libtpu's start-up lines on a machine without TPU chips, and what each variable silences:
_QUIET_TPU = {
    # "WARNING: Logging before InitGoogle() is written to STDERR", "E0000 ... common_lib.cc:554]
    # INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING: could not determine TPU worker
    # hostnames ...'", "=== Source Location Trace: ===", ".../libtpu_init_utils.cc:327"
    "TPU_WORKER_HOSTNAMES": "localhost",
    # "Failed to find host bounds for accelerator type: WARNING: could not determine TPU
    # accelerator type ..." (host bounds are otherwise derived from TPU_ACCELERATOR_TYPE, which
    # would have to name a chip this machine does not have)
    "TPU_HOST_BOUNDS": "1,1,1",
    # "ABORTED: Internal error when accessing libtpu multi-process lockfile" when another process
    # has libtpu loaded; deviceless compiles use no chip, so sharing is safe
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    # never ask the GCE metadata server for a TPU configuration (jax sets it too without chips)
    "TPU_SKIP_MDS_QUERY": "1",
}
# TPU_STDERR_LOG_LEVEL, TPU_MIN_LOG_LEVEL, TF_CPP_MIN_LOG_LEVEL and GRPC_VERBOSITY silence none of
# those lines: libtpu prints them before it reads its logging flags.


def quiet_environment() -> None:
    """Set up this process for compiling for a target it does not have; call it before JAX
    starts its backends. Variables already set are kept.

    * JAX_PLATFORMS=cpu: the CUDA plugin then skips its cuInit check, which fails without a GPU
      (a logged traceback, "operation cuInit(0) failed") and leaves no GPU topology to compile
      for; the deviceless TPU and GPU topologies work alongside the CPU backend.
    * on a machine without TPU chips, the libtpu variables of _QUIET_TPU; the deviceless
      topologies and the programs compiled for them are the same with and without them.
    """
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax = sys.modules.get("jax")  # already imported: it read JAX_PLATFORMS then
        if jax is not None and not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
    if not _tpu_chips_attached():
        for key, value in _QUIET_TPU.items():
            os.environ.setdefault(key, value)


# device files of accelerators JAX can drive (jax's hardware_utils checks the NVIDIA ones)
_ACCELERATOR_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def accelerator_visible() -> bool:
    """Whether this machine shows any accelerator: NVIDIA/AMD GPU device files, /dev/accel*
    (TPU VMs) or TPU chips on the PCI bus."""
    return (any(os.path.exists(p) for p in _ACCELERATOR_FILES) or bool(glob.glob("/dev/accel*"))
            or _tpu_chips_attached())


def quiet_cpu_only() -> None:
    """A CLI's start, before JAX starts its backends. On a machine with no accelerator, where the
    user asked for no platform (JAX_PLATFORMS unset), the installed CUDA and TPU plugins each
    print their failure (~15 lines: cuInit, libtpu) before JAX falls back to the CPU it would use
    anyway: start on the CPU directly (quiet_environment). A machine with an accelerator, or any
    JAX_PLATFORMS, is left alone, so real errors still show. When JAX_PLATFORMS names a platform,
    the plugins' logged start-up failures are held back for `platform_error`, which names the
    missing platform in one sentence if JAX then cannot start it."""
    import logging
    if os.environ.get("JAX_PLATFORMS"):
        bridge = logging.getLogger("jax._src.xla_bridge")
        if not any(isinstance(f, _HeldPluginErrors) for f in bridge.filters):
            bridge.addFilter(_HeldPluginErrors())
        if not _tpu_chips_attached():  # libtpu's hostname lines; they change nothing without chips
            for key, value in _QUIET_TPU.items():
                os.environ.setdefault(key, value)
        return
    if not accelerator_visible():
        quiet_environment()


class _HeldPluginErrors:
    """A logging filter that keeps jax's "Jax plugin configuration error" records (a logged
    traceback each) instead of printing them; platform_error reports them if they mattered."""
    held: list = []

    def filter(self, record) -> bool:
        if str(record.msg).startswith("Jax plugin configuration error"):
            reason = record.exc_info[1] if record.exc_info else record.getMessage()
            _HeldPluginErrors.held.append(_first_line(reason) if isinstance(reason, BaseException)
                                          else str(reason))
            return False
        return True


_PLATFORM_EXTRA = {"tpu": "tpu", "cuda": "cuda12", "gpu": "cuda12"}


def platform_error(error: BaseException) -> Optional[ConfigError]:
    """One sentence for JAX failing to start a platform JAX_PLATFORMS asks for (a RuntimeError
    "Unable to initialize backend 'tpu'", or the bare AssertionError jax's backends() raises when
    no asked-for platform started, e.g. cuda without a GPU); None for any other error."""
    asked = os.environ.get("JAX_PLATFORMS", "").strip()
    if not asked:
        return None
    text = str(error).strip()
    m = re.match(r"Unable to initialize backend '([\w-]+)': (.*)", text, re.S)
    if isinstance(error, RuntimeError) and m:
        platform = m.group(1)
        reason = re.sub(r"\s*\(set JAX_PLATFORMS=.*$", "", m.group(2).strip().splitlines()[0])
        reason = re.sub(r"^[A-Z_]+: ", "", reason)  # the status code: NOT_FOUND, INTERNAL, ...
    elif isinstance(error, AssertionError) and _raised_in(error, "xla_bridge.py"):
        platform = next((p.strip() for p in asked.split(",") if p.strip() != "cpu"), asked)
        reason = (_HeldPluginErrors.held[-1] if _HeldPluginErrors.held
                  else "no device of it is visible")
    else:
        return None
    extra = _PLATFORM_EXTRA.get(platform)
    plugin = f" ({install_line(extra)})" if extra else ""
    return ConfigError(f"JAX_PLATFORMS={asked} asks for the {platform} platform, which JAX cannot "
                       f"start on this machine ({reason.rstrip('.')}); unset JAX_PLATFORMS to use "
                       f"the devices found here, or run where a {platform} device is, with its "
                       f"plugin installed{plugin}")


def _raised_in(error: BaseException, filename: str) -> bool:
    import traceback
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.basename(frames[-1].filename) == filename


_TPU_PCI_DEVICE_IDS = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def _tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips (Google PCI devices with TPU ids, as jax checks)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == "0x1ae0" and g.read().strip() in _TPU_PCI_DEVICE_IDS:
                    return True
        except OSError:
            continue
    return False


# ---- installation checks -------------------------------------------------------------------------

def plugin_installed(module: str) -> bool:
    """Whether `module` ("libtpu", "jax_plugins.xla_cuda12") is importable, without importing it.
    find_spec of a dotted name imports the parent package first and raises ModuleNotFoundError when
    the parent is missing, and `jax_plugins` exists only once some JAX plugin is installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # no parent package; a module whose __spec__ is None
        return False


def install_line(extra: str) -> str:
    """The pip command that installs the accelerator plugin matching the installed jax."""
    import jax
    return f'pip install "jax[{extra}]=={jax.__version__}"'


def version_problem(dist: str, extra: str, installed: str) -> Optional[str]:
    """A sentence when `installed` (the version of package `dist`) is not what jax[extra] pins."""
    from importlib import metadata
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    import jax
    for line in metadata.requires("jax") or ():
        req = Requirement(line)
        if (canonicalize_name(req.name) == canonicalize_name(dist) and req.marker is not None
                and req.marker.evaluate({"extra": extra})):
            if req.specifier.contains(installed, prereleases=True):
                return None
            return (f"{dist} {installed} does not match jax {jax.__version__}, which needs "
                    f"{dist}{req.specifier}; reinstall with: {install_line(extra)}")
    return None


def _installed_version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _require_libtpu() -> None:
    # jax loads libtpu.so from TPU_LIBRARY_PATH when it names a file (importing libtpu sets it)
    if (not plugin_installed("libtpu")
            and not os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", ""))):
        raise ConfigError("libtpu is not installed, so there is no compiler for TPU targets; "
                          f"install it with: {install_line('tpu')}")
    installed = _installed_version("libtpu")
    problem = installed and version_problem("libtpu", "tpu", installed)
    if problem:
        raise ConfigError(problem)


def _require_cuda_plugin() -> None:
    for cuda in ("cuda12", "cuda13"):
        if plugin_installed(f"jax_plugins.xla_{cuda}"):
            installed = _installed_version(f"jax-{cuda}-plugin")
            problem = installed and version_problem(f"jax-{cuda}-plugin", cuda, installed)
            if problem:
                raise ConfigError(problem)
            return
    raise ConfigError("the JAX CUDA plugin is not installed, so there is no compiler for GPU "
                      f"targets; install it with: {install_line('cuda12')}")


def _require_cpu_platform() -> None:
    import jax
    value = jax.config.jax_platforms or ""
    platforms = {p.strip() for p in value.split(",") if p.strip()}
    if not platforms or platforms & {"cuda", "gpu"}:
        now = f"is {value!r}" if value else "is unset"
        raise ConfigError(f"GPU targets compile beside the CPU backend, but JAX_PLATFORMS {now}; "
                          "run with JAX_PLATFORMS=cpu (quiet_environment() sets it when unset)")


# ---- resolution ----------------------------------------------------------------------------------

def resolve_target(name: str) -> Target:
    """The deviceless devices and chip figures of `name`: a TPU topology as
    jax.experimental.topologies takes it ("v5p:2x2x2") or "gpu:h100x8" / "gpu:h200x8" /
    "gpu:h100x16" (two 8-GPU hosts). Results are cached."""
    return _resolve(str(name).strip().lower())


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> Target:
    tpu, gpu = _TPU_NAME.match(name), _GPU_NAME.match(name)
    if tpu:
        chip = CHIPS[tpu.group(1)]
        devices = _tpu_devices(name, chip)
    elif gpu:
        chip = CHIPS[gpu.group(1)]
        devices = _gpu_devices(name, chip, int(gpu.group(2)))
    else:
        raise UsageError(f"unknown compile target {name!r}; use {FORMS}")
    found = device_kind_chip(devices[0])
    if found is not chip:  # the table and the compiler disagree: a bug here, not a user mistake
        raise RuntimeError(f"{name}: devices report {devices[0].device_kind!r}, not {chip.name}")
    return Target(name=name, platform=chip.platform, chip=chip, devices=tuple(devices),
                  n_devices=len(devices), n_hosts=len({d.process_index for d in devices}))


def _tpu_devices(name: str, chip: Chip) -> list:
    _require_libtpu()
    from jax.experimental import topologies
    config = _TPU_CHIP_CONFIG.get(chip.name)
    options = {"chip_config_name": config} if config else {}
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices
    except RuntimeError as e:
        said = _first_line(e)
        if "lockfile" in said:
            raise ConfigError("libtpu is locked by another process (/tmp/libtpu_lockfile); call "
                              "reflex_jax.hardware.quiet_environment() before JAX starts, or set "
                              "ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None
        if "not installed" in said:
            raise ConfigError("libtpu is not installed, so there is no compiler for TPU targets; "
                              f"install it with: {install_line('tpu')}") from None
        if said.startswith("INVALID_ARGUMENT"):
            raise UsageError(f"libtpu rejects the TPU topology {name!r}: "
                             f"{said.split(':', 1)[1].strip().rstrip('.')}; use a slice shape that "
                             f"{chip.name}'s Cloud TPU page lists, such as "
                             f"{_TPU_EXAMPLE[chip.name]}") from None
        raise


def _gpu_devices(name: str, chip: Chip, n: int) -> list:
    if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
        raise UsageError(f"compile target {name!r} asks for {n} GPUs; use 1 to {GPUS_PER_HOST} "
                         f"GPUs on one host or a multiple of {GPUS_PER_HOST} for several hosts")
    _require_cuda_plugin()
    _require_cpu_platform()
    # "<NVLink domains>x<hosts per domain>x<GPUs per host>": an HGX host is one NVLink domain
    hosts = max(1, n // GPUS_PER_HOST)
    topology = f"{hosts}x1x{min(n, GPUS_PER_HOST)}"
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="cuda", topology=topology,
                                            target_config=_GPU_TARGET_CONFIG[chip.name]).devices
    except NotImplementedError:  # the plugin did not register: JAX started before JAX_PLATFORMS=cpu
        raise ConfigError("the JAX CUDA plugin did not start because JAX initialised its backends "
                          "before JAX_PLATFORMS=cpu was set; run with JAX_PLATFORMS=cpu, or call "
                          "reflex_jax.hardware.quiet_environment() before JAX starts") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
