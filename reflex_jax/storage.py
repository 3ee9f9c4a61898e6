"""Run files on a local disk or in a bucket (`gs://bucket/run`, also s3://, az://).

Local paths go through `os`; remote ones through `etils.epath`, which orbax also uses, and so
through fsspec (gcsfs for gs://). Orbax and tensorstore write the checkpoints themselves; this
module is for the small files around them (config.json, meta.json, metrics.jsonl).

Pointing gs:// at an emulator takes environment variables, read by the libraries: gcsfs's
`STORAGE_EMULATOR_HOST` (with `FSSPEC_GCS_TOKEN=anon`) and tensorstore's `TENSORSTORE_GCS_HTTP_URL`.
"""
from __future__ import annotations

import os
import posixpath
import re

from .errors import MissingFileError, UsageError

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
# what fsspec needs for each scheme that etils.epath knows, and its protocol name in fsspec
_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_PROTOCOLS = {"gs": "gcs"}


def scheme(path) -> str:
    """'gs' for gs://bucket/x, '' for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else ""


def is_remote(path) -> bool:
    return bool(scheme(path))


def resolve(path) -> str:
    """An absolute local path, or the remote URL without a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def _remote(path: str):
    from etils import epath
    name = scheme(path)
    if name not in _PACKAGES:
        raise UsageError(f"{path!r} uses {name}://, which is not supported; use a local path or "
                         f"one of {', '.join(s + '://' for s in _PACKAGES)}.")
    _fresh_listings(_PROTOCOLS.get(name, name))
    return epath.Path(path)


def _fresh_listings(protocol: str) -> None:
    """No listing from fsspec's cache, which never expires by default: a run directory is also
    written by tensorstore, by the other hosts and by a resumed run, so a cached listing of
    checkpoints/ would miss steps or name deleted ones. A user's own setting wins; it applies to
    filesystems created from now on (etils and orbax create theirs at first use)."""
    import fsspec.config
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def _call(path: str, fn):
    """fn(epath.Path) with a missing fsspec backend turned into one sentence."""
    try:
        return fn(_remote(path))
    except ImportError:
        package = _PACKAGES[scheme(path)]
        raise UsageError(f"{path!r} is on {scheme(path)}:// but {package} is not installed; "
                         f"pip install {package}.") from None


def exists(path) -> bool:
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.exists(path)
    return _call(path, lambda p: p.exists())


def isdir(path) -> bool:
    """Local: a directory. Remote: a prefix that holds at least one object."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isdir(path)
    return _call(path, lambda p: p.is_dir())


def makedirs(path) -> None:
    """Local: mkdir -p. Remote: nothing to do, a bucket has no directories to create."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """Sorted names directly under `path`."""
    path = os.fspath(path)
    if not is_remote(path):
        return sorted(os.listdir(path))
    return sorted(_call(path, lambda p: [c.name for c in p.iterdir()]))


def read_text(path) -> str:
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    try:
        return _call(path, lambda p: p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{path!r} does not exist; check the path and the bucket.") from None


def write_text_atomic(path, text: str) -> None:
    """Write `text` so that a reader sees the old file or the new one, never half of one.

    Local: a temporary file renamed over the target. Remote: one upload, since an object appears
    only once its upload completes (a rename there would be a copy and a delete)."""
    path = os.fspath(path)
    if not is_remote(path):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    try:
        _call(path, lambda p: p.write_text(text, encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"cannot write {path!r}: its bucket does not exist; create it or "
                               "fix the path.") from None


def local_cache_dir(path) -> str:
    """A local directory that stands for remote `path` on this machine, under
    $XDG_CACHE_HOME/reflex_jax (default ~/.cache): for files that must be on a local disk."""
    path = resolve(path)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "reflex_jax", scheme(path), _SCHEME.sub("", path))


def _filesystem(path: str):
    """(fsspec filesystem, its path) of a remote path, for what etils.epath cannot do."""
    def get(_):
        import fsspec.core
        return fsspec.core.url_to_fs(path)
    return _call(path, get)


def size(path) -> int:
    """Bytes in the file `path` (local or remote)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = _filesystem(path)
    return int(fs.size(p))


def read_range(path, start: int, end: int) -> bytes:
    """Bytes start..end-1 of the file `path` (remote: one ranged request)."""
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, p = _filesystem(path)
    return fs.cat_file(p, start=start, end=end)


def read_bytes(path) -> bytes:
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    return _call(path, lambda p: p.read_bytes())


def remove(path) -> None:
    """Remove the file `path` if it exists."""
    path = os.fspath(path)
    if not is_remote(path):
        if os.path.exists(path):
            os.remove(path)
        return
    if exists(path):
        _call(path, lambda p: p.unlink())


def upload_dir(local: str, remote: str, last: str = "") -> None:
    """The files of the flat local directory `local` into `remote`; `last` (a name) is uploaded
    after every other file, so that a reader who waits for it sees a complete directory."""
    names = sorted(os.listdir(local), key=lambda n: n == last)
    for name in names:
        with open(os.path.join(local, name), "rb") as f:
            data = f.read()
        try:
            _call(join(remote, name), lambda p, d=data: p.write_bytes(d))
        except FileNotFoundError:
            raise MissingFileError(f"cannot write {join(remote, name)!r}: its bucket does not "
                                   "exist; create it or fix the path.") from None
