"""Reading `torch.save` files (the zip format) without torch and without running code from them.

A `torch.save` file is a zip holding `<name>/data.pkl` (a pickle of the saved object) and one raw
little-endian byte file `<name>/data/<key>` per tensor storage. The pickle is read by a restricted
`pickle.Unpickler`:

* every global it names goes through `find_class`, which never imports anything. A few names map
  to builders of tensors and plain containers (`torch._utils._rebuild_tensor_v2`, the storage
  types, `collections.OrderedDict`, `builtins.set`, ...). Any other name becomes an inert record
  type: instances of it only store the arguments and state the pickle gives them (a notebook's
  `__main__.GPTConfig` dataclass comes out as a record of its fields);
* calling a record type (a REDUCE or INST on `os.system`, `builtins.eval`, `functools.partial`,
  ...) raises ConvertError, so nothing the pickle names ever runs;
* tensors come out as `TensorRef`s: shape, stride and offset into a storage whose bytes are read
  (and bounds-checked) only when `.array()` asks, so a checkpoint's optimizer state costs nothing
  unless it is used.

    with TorchArchive("ckpt_2000.pt") as archive:
        ckpt = archive.load()
        wte = ckpt["model"]["_orig_mod.transformer.wte.weight"].array()   # float32 numpy
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import os
import pickle
import zipfile
from typing import Any, Optional

import numpy as np

from ..errors import ConvertError

# storage type name -> (numpy dtype of the stored bytes, how it comes out)
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# containers and values whose construction runs no code of the file's choosing
_PLAIN_BUILTINS = ("set", "frozenset", "slice", "complex", "tuple", "list", "dict")
# numpy dtypes a pickled numpy scalar may have (numpy.dtype is built only for these)
_NUMPY_SCALARS = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


# ---- what the pickle builds ------------------------------------------------------------------

class _Frozen:
    """Objects this reader builds refuse a pickle's BUILD, which would overwrite their fields."""
    __slots__ = ()

    def __setstate__(self, state):
        raise ConvertError(f"the pickle tries to set the state of a {type(self).__name__}, which no "
                           "torch.save file does; the file is damaged or crafted, so re-save it.")


class StorageType(_Frozen):
    """A torch storage class named by the pickle (e.g. `torch.FloatStorage`): only its dtype."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class Storage(_Frozen):
    """One `data/<key>` entry of the archive; its bytes are read on first use."""
    __slots__ = ("archive", "key", "type_name", "numel", "_array")

    def __init__(self, archive: "TorchArchive", key: str, type_name: str, numel: int):
        self.archive, self.key, self.type_name, self.numel = archive, key, type_name, numel
        self._array: Optional[np.ndarray] = None

    def array(self, tensor: str = "") -> np.ndarray:
        """The whole storage as a flat numpy array of its stored dtype (bf16 as uint16).
        `tensor` names the tensor read through it, for the messages."""
        if self._array is None:
            dtype = np.dtype(_STORAGE_DTYPES[self.type_name]).newbyteorder(self.archive.byteorder)
            # checked before anything is read or allocated: the zip's record of the entry
            size = self.archive.entry_size(f"data/{self.key}", tensor)
            if size != self.numel * dtype.itemsize:
                raise ConvertError(f"{self.archive.path!r}: storage data/{self.key}{_of(tensor)} "
                                   f"holds {size} bytes but the pickle says {self.numel} x "
                                   f"{self.type_name}; the file is damaged, so save it again.")
            raw = self.archive.read_entry(f"data/{self.key}")
            self._array = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
        return self._array


class TensorRef(_Frozen):
    """A tensor of the pickle: a strided view into a Storage, materialised by `.array()`."""
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def type_name(self) -> str:
        return self.storage.type_name

    def array(self, name: str = "") -> np.ndarray:
        """A fresh numpy array: half and bfloat16 as float32, the other dtypes as stored. `name`
        (the tensor's key) goes into the messages."""
        n = int(np.prod(self.shape, dtype=object))
        if n > self.storage.numel:  # overlapping strides (stride 0) would allocate n elements
            raise ConvertError(f"{self.storage.archive.path!r}: tensor{_of(name, ' ')} has shape "
                               f"{self.shape} ({n:,} elements) but its storage data/"
                               f"{self.storage.key} holds only {self.storage.numel:,}, which no "
                               "saved weight does; the file is damaged or crafted, so re-save it.")
        flat = self.storage.array(name)
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(  # bounds were checked when the tensor was built
            flat[self.offset:], self.shape, tuple(s * itemsize for s in self.stride), writeable=False)
        out = np.array(view)
        if self.storage.type_name == "BFloat16Storage":
            return (out.astype(np.uint32) << 16).view(np.float32)
        if out.dtype == np.float16:
            return out.astype(np.float32)
        return out

    def __repr__(self) -> str:
        return f"TensorRef({self.type_name}, shape={self.shape})"


class NumpyDtype:
    """A numpy dtype named by the pickle (only for numpy scalars); the state numpy's pickle BUILDs
    onto it (byte order, flags) is ignored: only numeric little-endian scalars are read."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and state and state[1:2] in (("<",), ("|",), ("=",))):
            raise ConvertError("the pickle holds a numpy dtype that is not little-endian or not "
                               "plain; re-save the checkpoint with torch tensors instead.")


class _RecordMeta(type):
    """The metaclass of inert records: calling a record type would mean the pickle calls the
    class or function it names, so it is refused before anything runs."""

    def __call__(cls, *args, **kwargs):
        raise ConvertError(f"refused to read {cls._reader_path!r}: its pickle calls {cls.origin}, "
                           "which builds no tensor or container (a file that would run code when "
                           "loaded); none of it ran, so only use checkpoints from a source you trust.")


class InertRecord(metaclass=_RecordMeta):
    """An object of a class the reader does not know: the constructor arguments (NEWOBJ) and the
    state (BUILD) the pickle gave it, and nothing else. `fields` is the state dict."""
    origin = "?"
    _reader_path = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.fields, obj.list_items = args, kwargs, {}, []
        return obj

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            for part in state:
                if isinstance(part, dict):
                    self.fields.update(part)
        elif isinstance(state, dict):
            self.fields.update(state)
        else:
            self.fields["__state__"] = state

    # dict and list subclasses get their items through SETITEMS / APPENDS
    def __setitem__(self, key, value):
        self.fields[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"<record of {self.origin}: {self.fields!r}>"


# ---- the restricted unpickler ------------------------------------------------------------------

class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: "TorchArchive"):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.records: dict[str, type] = {}
        self.storages: dict[str, Storage] = {}
        self.allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type,
            ("torch", "Size"): tuple,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "object"): object,
            ("copyreg", "_reconstructor"): self._reconstructor,
            ("copyreg", "__newobj__"): self._newobj,
            ("_codecs", "encode"): self._encode,
            ("numpy", "dtype"): self._numpy_dtype,
            ("numpy.core.multiarray", "scalar"): self._numpy_scalar,
            ("numpy._core.multiarray", "scalar"): self._numpy_scalar,
            **{("builtins", n): getattr(builtins, n) for n in _PLAIN_BUILTINS},
        }

    def find_class(self, module: str, name: str):
        """Never imports: an allowed builder, a storage type, or an inert record type."""
        key = (str(module), str(name))
        # Python 2 names (protocol 2 writes __builtin__, copy_reg), mapped as pickle.Unpickler does
        key = _compat_pickle.NAME_MAPPING.get(key, key)
        key = (_compat_pickle.IMPORT_MAPPING.get(key[0], key[0]), key[1])
        if key in self.allowed:
            return self.allowed[key]
        if key[0] == "torch" and key[1] in _STORAGE_DTYPES:
            return StorageType(key[1])
        origin = f"{key[0]}.{key[1]}"
        if origin not in self.records:
            self.records[origin] = _RecordMeta(key[1] or "record", (InertRecord,), {
                "origin": origin, "_reader_path": self.archive.path, "__slots__": ()})
        return self.records[origin]

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> the archive's data/<key>."""
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], StorageType) or not isinstance(pid[2], str)
                or not _is_count(pid[4])):
            what = pid[1].origin if isinstance(pid, tuple) and len(pid) > 1 and hasattr(
                pid[1], "origin") else repr(pid)[:80]
            raise ConvertError(f"{self.archive.path!r} refers to a storage this reader cannot read "
                               f"({what}); only tensors of the types "
                               f"{', '.join(sorted(_STORAGE_DTYPES))} are supported, so re-save it "
                               "with those dtypes.")
        _, stype, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = Storage(self.archive, key, stype.name, numel)
        return self.storages[key]

    # ---- the allowed builders (their arguments come from the file: checked, never trusted) ----
    def _rebuild_tensor(self, storage, offset, size, stride, *_rest):
        if not (isinstance(storage, Storage) and _is_count(offset) and _is_shape(size)
                and _is_shape(stride) and len(size) == len(stride)):
            raise self._damaged("a tensor with malformed storage, offset, size or stride")
        size, stride = tuple(size), tuple(stride)
        if all(size):  # a non-empty tensor: its last element must lie inside the storage
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise self._damaged(f"a tensor of shape {size} that reaches past its storage "
                                    f"data/{storage.key} ({storage.numel} elements)")
        return TensorRef(storage, offset, size, stride)

    def _rebuild_parameter(self, data, *_rest):
        if not isinstance(data, TensorRef):
            raise self._damaged("a parameter that holds no tensor")
        return data

    def _rebuild_from_type(self, func, _new_type, args, _state):
        if func not in (self._rebuild_tensor, self._rebuild_parameter) or not isinstance(args, tuple):
            raise self._damaged("a tensor subclass rebuilt by something other than a tensor builder")
        return func(*args)

    def _reconstructor(self, cls, base, state=None):
        if not _is_record(cls) or base is not object or state is not None:
            raise self._refused("copyreg._reconstructor", cls)
        return cls.__new__(cls)

    def _newobj(self, cls, *args):
        if not _is_record(cls):
            raise self._refused("copyreg.__newobj__", cls)
        return cls.__new__(cls, *args)

    def _encode(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self._damaged("a bytes object in an unexpected encoding")
        return text.encode("latin1")

    def _numpy_dtype(self, name, *_flags):
        if name not in _NUMPY_SCALARS:
            raise self._damaged(f"a numpy value of dtype {name!r}")
        return NumpyDtype(name)

    def _numpy_scalar(self, dtype, data=None):
        if not isinstance(dtype, NumpyDtype) or dtype.name not in _NUMPY_SCALARS \
                or not isinstance(data, bytes) or len(data) != np.dtype(dtype.name).itemsize:
            raise self._damaged("a malformed numpy scalar")
        return np.frombuffer(data, np.dtype(dtype.name))[0].item()

    def _damaged(self, what: str) -> ConvertError:
        return ConvertError(f"{self.archive.path!r} holds {what}, which torch.save never writes; the "
                            "file is damaged or crafted, so re-save it from the original model.")

    def _refused(self, via: str, cls) -> ConvertError:
        target = getattr(cls, "origin", type(cls).__name__)
        return ConvertError(f"refused to read {self.archive.path!r}: its pickle uses {via} to build "
                            f"{target}, which is no plain record (a file that would run code when "
                            "loaded); none of it ran, so only use checkpoints from a source you "
                            "trust.")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_shape(x) -> bool:
    return isinstance(x, (tuple, list)) and all(_is_count(n) for n in x)


def _is_record(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, InertRecord)


# ---- the archive --------------------------------------------------------------------------------

class TorchArchive:
    """An open `torch.save` zip: `load()` the pickled object; its TensorRefs read from here, so
    call `.array()` before closing (use it as a context manager)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise ConvertError(f"{path!r} does not exist or is not a file; pass the path of a "
                               "torch.save checkpoint (e.g. ckpt_2000.pt).")
        if not zipfile.is_zipfile(path):
            raise ConvertError(f"{path!r} is not a torch.save zip archive (the legacy pre-1.6 format "
                               "or not a checkpoint at all); re-save it with torch.save from a "
                               "current PyTorch.")
        self.zip = zipfile.ZipFile(path)
        pickles = [n for n in self.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            self.zip.close()
            raise ConvertError(f"{path!r} is a zip but not a torch.save archive (it has "
                               f"{len(pickles)} top-level */data.pkl entries, not 1); pass a file "
                               "written by torch.save.")
        self.prefix = pickles[0][:-len("data.pkl")]
        order = self._optional_entry("byteorder")
        self.byteorder = ">" if order is not None and order.strip() == b"big" else "<"

    def _optional_entry(self, name: str) -> Optional[bytes]:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            return None

    def entry_size(self, name: str, tensor: str = "") -> int:
        """The uncompressed size the zip's directory records for `<prefix>/name`, once the entry
        is known to hold those bytes in the file itself (check_stored)."""
        try:
            info = self.zip.getinfo(self.prefix + name)
        except KeyError:
            raise self._lacks(name) from None
        check_stored(self.path, info, os.path.getsize(self.path), tensor)
        return info.file_size

    def _lacks(self, name: str) -> ConvertError:
        return ConvertError(f"{self.path!r} lacks the entry {self.prefix}{name} that its pickle "
                            "refers to; the file is truncated or damaged, so save it again.")

    def read_entry(self, name: str) -> bytes:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            raise self._lacks(name) from None
        except (zipfile.BadZipFile, OSError) as e:
            raise ConvertError(f"{self.path!r}: entry {self.prefix}{name} cannot be read ({e}); the "
                               "file is damaged, so save it again.") from None

    def load(self) -> Any:
        """The saved object: containers, plain values, TensorRefs and InertRecords."""
        data = self.read_entry("data.pkl")
        try:
            return _Unpickler(data, self).load()
        except ConvertError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                IndexError, KeyError, RecursionError, MemoryError) as e:
            raise ConvertError(f"{self.path!r} could not be read as a torch.save pickle "
                               f"({type(e).__name__}: {str(e)[:160]}); the file is damaged or "
                               "not a checkpoint, so re-save it.") from None

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _of(tensor: str, sep: str = " of ") -> str:
    return f"{sep}{tensor}" if tensor else ""


def check_stored(path: str, info: zipfile.ZipInfo, file_bytes: int, tensor: str = "") -> None:
    """torch.save stores every entry uncompressed, so an entry's bytes lie in the file as they
    are: refuse a compressed one (a few MB that inflate to GiB) or one that claims more bytes
    than the file holds, before anything is read or allocated."""
    stored = info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size
    if not stored or info.header_offset + info.compress_size > file_bytes:
        raise ConvertError(f"{path!r}: entry {info.filename}{_of(tensor, ' (tensor ')}"
                           f"{')' if tensor else ''} declares {info.file_size:,} bytes but the "
                           f"file holds {min(info.compress_size, file_bytes):,} of it"
                           f"{' compressed' if info.compress_type != zipfile.ZIP_STORED else ''}, "
                           "and torch.save stores tensors uncompressed; the file was altered or "
                           "is crafted, so re-save it with torch.save.")


def check_storage_entries(path: str) -> None:
    """check_stored for every entry of a torch.save zip (for readers that hand the file to
    torch.load, which inflates whatever an entry declares)."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                check_stored(path, info, size)
    except zipfile.BadZipFile as e:
        raise ConvertError(f"{path!r} is a damaged zip archive ({e}); re-save the checkpoint.") from None


def materialize(obj: Any, name: str = "") -> Any:
    """`obj` with every TensorRef replaced by its numpy array (containers and records walked)."""
    if isinstance(obj, TensorRef):
        return obj.array(name)

    def at(key) -> str:
        return f"{name}.{key}" if name else str(key)

    if isinstance(obj, InertRecord):
        obj.fields = {k: materialize(v, at(k)) for k, v in obj.fields.items()}
        return obj
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, materialize(v, at(k))) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: materialize(v, at(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(materialize(v, at(i)) for i, v in enumerate(obj))
    return obj


def load_torch_file(path: str) -> Any:
    """The whole saved object of a torch.save file, every tensor as a numpy array."""
    with TorchArchive(path) as archive:
        return materialize(archive.load())
