"""Skip marks for the tests that compile for TPUs or GPUs on this CPU: they need the JAX TPU plugin
(libtpu) or the JAX CUDA plugin, which `pip install -e ".[dev]"` does not install. Each skip says
which plugin is missing and how to install it."""
import pytest

from reflex_jax import hardware

INSTALL = 'pip install -e ".[dev,tpu,cuda12]"'
HAVE_LIBTPU = hardware.plugin_installed("libtpu")
HAVE_CUDA = hardware.plugin_installed("jax_plugins.xla_cuda12")

needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason=f"needs the JAX TPU plugin (libtpu), not installed: {INSTALL}")
needs_cuda = pytest.mark.skipif(
    not HAVE_CUDA, reason=f"needs the JAX CUDA plugin (jax_plugins.xla_cuda12), not installed: "
                          f"{INSTALL}")
