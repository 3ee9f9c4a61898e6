import atexit
import os
import shutil
import tempfile

# Tests run on the CPU, offline, from any working directory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402 - imported before the cache settings below, so they miss this process

# One persistent compilation cache per test session for the train.py / sample.py subprocesses the
# tests start (they copy os.environ): a resumed or repeated run loads the step an earlier process
# compiled instead of compiling it again. jax reads these variables at import, so this process
# (already importing jax above) does not use the cache: its many small compiles would only pay for
# the writes. Fresh each session, so no test sees an older build.
_CACHE = tempfile.mkdtemp(prefix="reflex-jax-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# pytest-xdist's workers inherit these variables from the controller and import jax with them set:
# switch the cache off in-process there too (a deviceless TPU compile read it and logged "Error
# reading persistent compilation cache entry")
jax.config.update("jax_compilation_cache_dir", None)
