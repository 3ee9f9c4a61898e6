import atexit
import os
import shutil
import tempfile

# Tests run on the CPU, offline, from any working directory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent compilation cache per test session, inherited by the train.py subprocesses the
# tests start (they copy os.environ): a resumed or repeated run loads the step an earlier process
# compiled instead of compiling it again. Fresh each session, so no test sees an older build.
_CACHE = tempfile.mkdtemp(prefix="reflex-jax-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
