"""Marks shared by the test files.

needs_libtpu, needs_cuda: the tests that compile for TPUs or GPUs on this CPU need the JAX TPU
plugin (libtpu) or the JAX CUDA plugin, which `pip install -e ".[dev]"` does not install; each skip
says which plugin is missing and how to install it. They are also slow: deviceless compiles take
seconds each, and CI runs the fast lane before it installs the plugins.

slow, fast_only: the fast lane, `python -m pytest -q -m "not slow" tests`, leaves out the tests
marked slow (pytest.ini says which kinds); `fast_only` keeps a representative few cases of a
parametrized test in it."""
import pytest

from reflex_jax import hardware

INSTALL = 'pip install -e ".[dev,tpu,cuda12]"'
HAVE_LIBTPU = hardware.plugin_installed("libtpu")
HAVE_CUDA = hardware.plugin_installed("jax_plugins.xla_cuda12")

slow = pytest.mark.slow
_without_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason=f"needs the JAX TPU plugin (libtpu), not installed: {INSTALL}")
_without_cuda = pytest.mark.skipif(
    not HAVE_CUDA, reason=f"needs the JAX CUDA plugin (jax_plugins.xla_cuda12), not installed: "
                          f"{INSTALL}")


def needs_libtpu(test):
    return slow(_without_libtpu(test))


def needs_cuda(test):
    return slow(_without_cuda(test))


def fast_only(values, *fast, unpack=False):
    """`values` for pytest.mark.parametrize with every value not in `fast` marked slow. With
    several argnames (`unpack`), each value is the tuple of their values."""
    return [v if v in fast else pytest.param(*(v if unpack else (v,)), marks=slow)
            for v in values]
