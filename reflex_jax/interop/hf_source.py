"""Reading an HF checkpoint (a local directory or a hub id) into numpy, without running code, and
the GPT-2 source: its tensors and their shapes against its config.json (the Llama family's are in
hf_llama.py).

`model.safetensors` is read through the safetensors library (numpy); `pytorch_model.bin` only
through `torch.load(weights_only=True)`: a pickle that would execute code is refused. Everything is
upcast to float32 before it is cast to the target's param dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping, Optional

import numpy as np

from ..errors import ConvertError
from ..model import ModelConfig
from .hub import looks_like_hub_id, snapshot

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "special_tokens_map.json")


@dataclasses.dataclass
class Source:
    """An HF GPT-2 checkpoint: config.json and float32 tensors named without the `transformer.` prefix
    (the Llama family's subclass is hf_llama.LlamaSource)."""
    where: str                       # what the user passed (local dir or hub id)
    directory: str                   # local directory holding the files
    hub_id: Optional[str]
    config: dict
    tensors: dict[str, np.ndarray]
    files: list[str]

    family = "GPT-2"      # for messages
    layer_prefix = "h"    # source layer i's tensors are named `h.{i}.*`

    @property
    def n_layer(self) -> int:
        prefix = self.layer_prefix + "."
        return len({k.split(".")[1] for k in self.tensors if k.startswith(prefix)})

    @property
    def n_head(self) -> int:
        return int(self.config.get("n_head", 0))

    @property
    def tokenizer(self) -> Optional[str]:
        """What `load_tokenizer` needs to find this checkpoint's tokenizer, if it ships one."""
        if not any(os.path.exists(os.path.join(self.directory, f)) for f in TOKENIZER_FILES):
            return None
        return self.hub_id or self.directory

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConvertError(f"the checkpoint in {self.where!r} has no tensor {name!r}; it is not a "
                               f"complete {self.family} checkpoint (re-save it with save_pretrained).")
        return self.tensors[name]

    def describe(self) -> str:
        wpe = self.tensors.get("wpe.weight")
        wte = self.tensors.get("wte.weight")
        return (f"{self.where} ({', '.join(self.files)}): {self.n_layer} layers x {self.n_head} heads, "
                f"n_embd {wte.shape[1] if wte is not None else '?'}, "
                f"{wpe.shape[0] if wpe is not None else '?'} positions, "
                f"vocab {wte.shape[0] if wte is not None else '?'}")


def _download(hub_id: str) -> str:
    """Snapshot of config, tokenizer and weights (safetensors if the repo has them, else .bin)."""
    base = ["config.json", *TOKENIZER_FILES]
    directory = snapshot(hub_id, base + ["model*.safetensors*"], "--hf", "a local directory")
    if not any(f.endswith(".safetensors") for f in os.listdir(directory)):
        directory = snapshot(hub_id, base + ["pytorch_model*.bin*"], "--hf", "a local directory")
    return directory


def _load_torch_file(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path!r} is a PyTorch pickle and reading it needs torch; install torch "
                           f"or provide {SAFETENSORS} instead.") from None
    import pickle
    import zipfile
    if zipfile.is_zipfile(path):  # torch.load would inflate whatever an entry declares
        from .safe_pickle import check_storage_entries
        check_storage_entries(path)
    try:
        # weights_only=True: the restricted unpickler builds tensors and containers only and
        # refuses any other global, so a malicious pickle fails before any of its code runs.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        what = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise ConvertError(f"refused to load {path!r}: its pickle would do more than build tensors "
                           f"({what}); only load checkpoints you trust, ideally as {SAFETENSORS}."
                           ) from None
    except Exception as e:
        raise ConvertError(f"{path!r} could not be read as a PyTorch state dict "
                           f"({type(e).__name__}: {str(e)[:200]}); re-save the checkpoint.") from None
    if not isinstance(state, Mapping):
        raise ConvertError(f"{path!r} holds a {type(state).__name__}, not a state dict of tensors; "
                           "re-save the model with save_pretrained.")
    out = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out[k] = t.detach().to(torch.float32).numpy()
    return out


def _load_safetensors_file(path: str) -> dict:
    from safetensors import SafetensorError, safe_open
    out = {}
    try:  # the library checks the header (length, JSON, offsets) against the file before reading
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if np.issubdtype(t.dtype, np.floating) or t.dtype.name == "bfloat16":
                    out[k] = t.astype(np.float32)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConvertError(f"{path!r} cannot be read as safetensors ({said}); the file is damaged "
                           "or not a safetensors file, so download or save it again.") from None
    return out


def _read_json_object(path: str, what: str) -> dict:
    """A JSON object file of the checkpoint (config.json, an index), or one sentence naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        said = getattr(e, "strerror", None) or str(e)[:160]
        raise ConvertError(f"{path!r} is not valid JSON ({said}); it should be the checkpoint's "
                           f"{what}, so download or save the checkpoint again.") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path!r} holds a JSON {type(value).__name__}, not an object; it should "
                           f"be the checkpoint's {what}, so download or save it again.")
    return value


def _index_files(directory: str, index: str) -> list[str]:
    """The weight files an index's weight_map names; each must lie inside `directory`."""
    path = os.path.join(directory, index)
    weight_map = _read_json_object(path, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConvertError(f"{path!r} has no weight_map of tensor names to file names; download "
                           "or save the checkpoint again.")
    files = sorted(set(weight_map.values()))
    for name in files:
        # an index is data from the download: a name like ../../etc/passwd must not be read. The
        # check is on the name, not the resolved file: the HF cache's files are symlinks to blobs
        # outside the snapshot directory.
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise ConvertError(f"{path!r} maps tensors to {name!r}, a path that leaves the "
                               f"checkpoint directory {directory!r}; refusing to read it, so fix "
                               "the index or download the checkpoint again.")
    return files


def _weight_files(directory: str) -> list[str]:
    """The weight files to read, safetensors first (sharded or not), then PyTorch .bin."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if os.path.exists(os.path.join(directory, single)):
            return [single]
        if os.path.exists(os.path.join(directory, index)):
            return _index_files(directory, index)
    raise ConvertError(f"{directory!r} holds neither {SAFETENSORS} nor {TORCH_BIN}; point --hf at an HF "
                       "checkpoint directory (saved with save_pretrained).")


def open_checkpoint(hf: str) -> tuple[str, Optional[str], dict]:
    """(local directory, hub id or None, config.json) of a local directory or a hub id (never
    trust_remote_code)."""
    path = os.path.abspath(os.path.expanduser(hf))
    if os.path.isdir(path):
        directory, hub_id = path, None
    elif looks_like_hub_id(hf):
        directory, hub_id = _download(hf), hf
    else:
        raise ConvertError(f"--hf {hf!r} is neither an existing directory nor an HF hub id "
                           "(owner/name); fix the path.")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise ConvertError(f"{directory!r} has no config.json; point --hf at an HF checkpoint "
                           "directory (saved with save_pretrained).")
    return directory, hub_id, _read_json_object(cfg_path, "config.json (the model's settings)")


def read_tensors(directory: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(weight files, float32 tensors under their stored names) of a checkpoint directory."""
    files = _weight_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        full = os.path.join(directory, name)
        if not os.path.exists(full):
            raise ConvertError(f"{full!r} is listed in the index but missing; download the checkpoint "
                               "again.")
        part = _load_safetensors_file(full) if name.endswith(".safetensors") else _load_torch_file(full)
        tensors.update(part)
    return files, tensors


def load_gpt2(hf: str) -> Source:
    """Read an HF GPT-2 checkpoint from a local directory or a hub id (never trust_remote_code)."""
    directory, hub_id, config = open_checkpoint(hf)
    if config.get("model_type", "gpt2") != "gpt2":
        raise ConvertError(f"{hf!r} is a {config['model_type']!r} model; load_gpt2 reads GPT-2 "
                           "checkpoints (model_type 'gpt2') only, so use hf_import.load_hf.")
    return gpt2_source(hf, directory, hub_id, config)


def gpt2_source(hf: str, directory: str, hub_id: Optional[str], config: dict) -> Source:
    """The GPT-2 Source of an opened checkpoint, its shapes checked against its config.json."""
    files, stored = read_tensors(directory)
    tensors: dict[str, np.ndarray] = {}
    for k, v in stored.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        # h.N.attn.bias / masked_bias are causal-mask buffers of old checkpoints, not weights.
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k):
            continue
        tensors[k] = v
    source = Source(hf, directory, hub_id, config, tensors, files)
    check_shapes(source)
    return source


# ---- every tensor's shape against the source's own config.json, before any reshape -------------

_LAYER_TENSOR = re.compile(r"h\.(\d+)\.(.+)")


def expected_shapes(source: Source) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, the config.json values that imply it) per tensor name the mapping reads, for the
    names present; HF Conv1D weights are [in, out]. A config key the file lacks is taken from the
    tensor that defines it (wte.weight, wpe.weight); n_inner None means 4 * n_embd, as in HF."""
    E = _dim(source, ("n_embd",), "wte.weight", 1)
    V = _dim(source, ("vocab_size",), "wte.weight", 0)
    P = _dim(source, ("n_positions", "n_ctx"), "wpe.weight", 0)
    if E is None:  # neither n_embd nor wte.weight: source.tensor() names what is missing later
        return {}
    inner = source.config.get("n_inner")
    F = int(inner) if inner else 4 * E
    e, ve, pe = f"n_embd={E}", f"vocab_size={V}, n_embd={E}", f"n_positions={P}, n_embd={E}"
    fe = f"n_embd={E}, n_inner={inner}" if inner else f"n_embd={E}, n_inner=None (4 * n_embd)"
    top = {"wte.weight": ((V, E), ve), "lm_head.weight": ((V, E), ve), "wpe.weight": ((P, E), pe),
           "ln_f.weight": ((E,), e), "ln_f.bias": ((E,), e)}
    block = {"ln_1.weight": (E,), "ln_1.bias": (E,), "ln_2.weight": (E,), "ln_2.bias": (E,),
             "attn.c_attn.weight": (E, 3 * E), "attn.c_attn.bias": (3 * E,),
             "attn.c_proj.weight": (E, E), "attn.c_proj.bias": (E,),
             "mlp.c_fc.weight": (E, F), "mlp.c_fc.bias": (F,),
             "mlp.c_proj.weight": (F, E), "mlp.c_proj.bias": (E,)}
    out = {}
    for name in source.tensors:
        m = _LAYER_TENSOR.fullmatch(name)
        if name in top:
            out[name] = top[name]
        elif m and m.group(2) in block:
            out[name] = (block[m.group(2)], fe if m.group(2).startswith("mlp.") else e)
    return out


def _dim(source: Source, keys: tuple[str, ...], tensor: str, axis: int) -> Optional[int]:
    """A size from config.json, else from the tensor that defines it, else None (neither there)."""
    for key in keys:
        if source.config.get(key) is not None:
            return int(source.config[key])
    if tensor not in source.tensors:
        return None
    shape = source.tensors[tensor].shape
    if len(shape) != 2:
        raise ConvertError(f"source tensor {tensor} has shape {tuple(shape)}, not a matrix, and "
                           f"config.json has no {keys[0]}; the checkpoint in {source.where!r} is "
                           "damaged, so download it again or re-save it with save_pretrained.")
    return int(shape[axis])


def check_shapes(source: Source) -> None:
    """Every tensor the mapping reads has the shape the source's config.json implies, and no
    layer lies beyond its n_layer: a damaged or mismatched checkpoint fails here, by name."""
    fix = (f"the checkpoint in {source.where!r} is damaged or does not match its config.json; "
           "download it again or re-save it with save_pretrained.")
    for name, (shape, why) in expected_shapes(source).items():
        got = tuple(source.tensors[name].shape)
        if got != shape and None not in shape:  # None: a size neither config nor tensors give
            raise ConvertError(f"source tensor {name} has shape {got} but config.json ({why}) "
                               f"implies {shape}; {fix}")
    n_layer = source.config.get("n_layer")
    for name in source.tensors:
        m = _LAYER_TENSOR.fullmatch(name)
        if n_layer is not None and m and int(m.group(1)) >= int(n_layer):
            raise ConvertError(f"source tensor {name} belongs to layer {m.group(1)} but config.json "
                               f"has n_layer={n_layer} (layers 0..{int(n_layer) - 1}); {fix}")


def matching_config(source: Source, **overrides) -> ModelConfig:
    """The vanilla GPT-2 ModelConfig that reproduces `source` exactly (fields overridable)."""
    check_shapes(source)
    wte, wpe = source.tensor("wte.weight"), source.tensor("wpe.weight")
    fields = dict(vocab_size=wte.shape[0], block_size=wpe.shape[0], n_layer=source.n_layer,
                  n_head=source.n_head, n_embd=wte.shape[1],
                  mlp_hidden=source.tensor("h.0.mlp.c_fc.weight").shape[1],
                  norm="layernorm", norm_eps=float(source.config.get("layer_norm_epsilon", 1e-5)),
                  mlp="gelu", bias=True, pos_emb="learned",
                  tie_embeddings=bool(source.config.get("tie_word_embeddings", True)),
                  dropout=0.0, head_plan="none")
    fields.update(overrides)
    return ModelConfig(**fields)
