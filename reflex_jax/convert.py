"""HF GPT-2 checkpoint -> params for any reflex `ModelConfig` (issue 3; mapping in notes/convert.md).

    source = load_gpt2("ai-forever/rugpt3large_based_on_gpt2")   # or a local HF directory
    params, report = convert_gpt2(cfg, source, layers=[0, 4, 8, 12, 16, 20])
    print(report.table())

Weights are read without running code: `model.safetensors` through the safetensors library (numpy),
`pytorch_model.bin` only through `torch.load(weights_only=True)`; a pickle that would execute code is
refused. Everything is upcast to float32 before it is cast to the target's param dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from .config import ModelConfig

# SwiGLU <- GELU: gate = ALPHA * c_fc, up = 0 * x + 1/ALPHA, down = c_proj, so the hidden unit is
# silu(ALPHA z) / ALPHA = z * sigmoid(ALPHA z), the sigmoid approximation of gelu(z) (Hendrycks & Gimpel).
SWIGLU_ALPHA = 1.702

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class ConvertError(ValueError):
    """A checkpoint that cannot be converted as asked; the message names the tensor/flag and the fix."""


# ---- reading the source -----------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """An HF GPT-2 checkpoint: config.json and float32 tensors named without the `transformer.` prefix."""
    where: str                       # what the user passed (local dir or hub id)
    directory: str                   # local directory holding the files
    hub_id: Optional[str]
    config: dict
    tensors: dict[str, np.ndarray]
    files: list[str]

    @property
    def n_layer(self) -> int:
        return len({k.split(".")[1] for k in self.tensors if k.startswith("h.")})

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
                               "complete GPT-2 checkpoint (re-save it with save_pretrained).")
        return self.tensors[name]

    def describe(self) -> str:
        wpe = self.tensors.get("wpe.weight")
        wte = self.tensors.get("wte.weight")
        return (f"{self.where} ({', '.join(self.files)}): {self.n_layer} layers x {self.n_head} heads, "
                f"n_embd {wte.shape[1] if wte is not None else '?'}, "
                f"{wpe.shape[0] if wpe is not None else '?'} positions, "
                f"vocab {wte.shape[0] if wte is not None else '?'}")


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "~"))


def _download(hub_id: str) -> str:
    """Snapshot of config, tokenizer and weights (safetensors if the repo has them, else .bin)."""
    from huggingface_hub import snapshot_download
    base = ["config.json", *TOKENIZER_FILES]
    try:
        directory = snapshot_download(hub_id, allow_patterns=base + ["model*.safetensors*"])
        if not any(f.endswith(".safetensors") for f in os.listdir(directory)):
            directory = snapshot_download(hub_id, allow_patterns=base + ["pytorch_model*.bin*"])
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"--hf {hub_id!r} is not a local directory and could not be fetched from the "
                           f"HF hub ({first}); download it where there is network and pass the local "
                           "directory instead.") from None
    return directory


def _load_torch_file(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path!r} is a PyTorch pickle and reading it needs torch; install torch "
                           f"or provide {SAFETENSORS} instead.") from None
    import pickle
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
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="np") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if np.issubdtype(t.dtype, np.floating) or t.dtype.name == "bfloat16":
                out[k] = t.astype(np.float32)
    return out


def _weight_files(directory: str) -> list[str]:
    """The weight files to read, safetensors first (sharded or not), then PyTorch .bin."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if os.path.exists(os.path.join(directory, single)):
            return [single]
        if os.path.exists(os.path.join(directory, index)):
            with open(os.path.join(directory, index), encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
    raise ConvertError(f"{directory!r} holds neither {SAFETENSORS} nor {TORCH_BIN}; point --hf at an HF "
                       "GPT-2 checkpoint directory (saved with save_pretrained).")


def load_gpt2(hf: str) -> Source:
    """Read an HF GPT-2 checkpoint from a local directory or a hub id (never trust_remote_code)."""
    path = os.path.abspath(os.path.expanduser(hf))
    if os.path.isdir(path):
        directory, hub_id = path, None
    elif _looks_like_hub_id(hf):
        directory, hub_id = _download(hf), hf
    else:
        raise ConvertError(f"--hf {hf!r} is neither an existing directory nor an HF hub id "
                           "(owner/name); fix the path.")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise ConvertError(f"{directory!r} has no config.json; point --hf at an HF GPT-2 checkpoint "
                           "directory (saved with save_pretrained).")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type", "gpt2") != "gpt2":
        raise ConvertError(f"{hf!r} is a {config['model_type']!r} model; convert_weights reads GPT-2 "
                           "checkpoints (model_type 'gpt2') only.")
    files = _weight_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        full = os.path.join(directory, name)
        if not os.path.exists(full):
            raise ConvertError(f"{full!r} is listed in the index but missing; download the checkpoint "
                               "again.")
        part = _load_safetensors_file(full) if name.endswith(".safetensors") else _load_torch_file(full)
        for k, v in part.items():
            k = k[len("transformer."):] if k.startswith("transformer.") else k
            # h.N.attn.bias / masked_bias are causal-mask buffers of old checkpoints, not weights.
            if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k):
                continue
            tensors[k] = v
    return Source(hf, directory, hub_id, config, tensors, files)


def matching_config(source: Source, **overrides) -> ModelConfig:
    """The vanilla GPT-2 ModelConfig that reproduces `source` exactly (fields overridable)."""
    wte, wpe = source.tensor("wte.weight"), source.tensor("wpe.weight")
    fields = dict(vocab_size=wte.shape[0], block_size=wpe.shape[0], n_layer=source.n_layer,
                  n_head=source.n_head, n_embd=wte.shape[1],
                  mlp_hidden=source.tensor("h.0.mlp.c_fc.weight").shape[1],
                  norm="layernorm", norm_eps=float(source.config.get("layer_norm_epsilon", 1e-5)),
                  mlp="gelu", bias=True, pos_emb="learned",
                  tie_embeddings=bool(source.config.get("tie_word_embeddings", True)),
                  dropout=0.0, reflex="none")
    fields.update(overrides)
    return ModelConfig(**fields)


# ---- the report -------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    status: str        # copied | sliced | constant | new | dropped
    target: str        # target param path ('' for dropped source tensors)
    source: str        # source tensor and slice ('' for new)
    n_params: int      # target elements written (for dropped: source elements unused)


@dataclasses.dataclass
class Report:
    source: str
    target: str
    layers: list[int]
    rows: list[Row]
    notes: list[str]

    def totals(self) -> dict[str, int]:
        out = {s: 0 for s in ("copied", "sliced", "constant", "new", "dropped")}
        for r in self.rows:
            out[r.status] += r.n_params
        return out

    def table(self) -> str:
        """Rows grouped over layers (h_{i} <- h.{j}, with i -> j as in the `layers` line)."""
        groups: dict[tuple, list] = {}
        for r in self.rows:
            key = (r.status, re.sub(r"^h_\d+\.", "h_{i}.", r.target),
                   re.sub(r"^h\.\d+\.", "h.{j}.", r.source))
            groups.setdefault(key, []).append(r.n_params)
        lines = [f"source: {self.source}", f"target: {self.target}",
                 "layers: " + ", ".join(f"h_{i} <- h.{j}" for i, j in enumerate(self.layers)),
                 "", "| status | params | target | source |", "|---|---:|---|---|"]
        order = {"copied": 0, "sliced": 1, "constant": 2, "new": 3, "dropped": 4}
        for (status, target, source), counts in sorted(groups.items(), key=lambda kv: order[kv[0][0]]):
            n = f"{sum(counts):,}" + (f" ({len(counts)}x)" if len(counts) > 1 else "")
            lines.append(f"| {status} | {n} | {target or '-'} | {source or '-'} |")
        t = self.totals()
        written = t["copied"] + t["sliced"] + t["constant"] + t["new"]
        lines += ["", f"target params {written:,}: copied {t['copied']:,}, sliced {t['sliced']:,}, "
                  f"constant {t['constant']:,}, new {t['new']:,}; source params dropped "
                  f"{t['dropped']:,}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- the mapping ------------------------------------------------------------------------------

def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """`'0,4,8'` -> [0, 4, 8]; None or '' -> None (target layer i <- source layer i)."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConvertError(f"--layers={text!r} must be comma-separated source layer indices, e.g. "
                           "--layers 0,4,8,12.") from None


def _pick_layers(cfg: ModelConfig, source: Source, layers: Optional[Sequence[int]]) -> list[int]:
    n_src = source.n_layer
    if layers is None:
        if cfg.n_layer > n_src:
            raise ConvertError(f"model.n_layer={cfg.n_layer} exceeds the source's {n_src} layers; lower "
                               f"n_layer or pass --layers with {cfg.n_layer} source indices "
                               "(repeats allowed).")
        return list(range(cfg.n_layer))
    layers = list(layers)
    if len(layers) != cfg.n_layer:
        raise ConvertError(f"--layers lists {len(layers)} source layers but model.n_layer="
                           f"{cfg.n_layer}; give exactly one source layer per target layer.")
    for j in layers:
        if not 0 <= j < n_src:
            raise ConvertError(f"--layers names source layer {j}, but the source has {n_src} layers "
                               f"(0..{n_src - 1}); pick indices in that range.")
    return layers


def _check_shapes(cfg: ModelConfig, source: Source) -> None:
    wte = source.tensor("wte.weight")
    if wte.shape[1] != cfg.n_embd:
        raise ConvertError(f"source tensor wte.weight has shape {tuple(wte.shape)} but the target needs "
                           f"{(cfg.vocab_size, cfg.n_embd)}: n_embd differs; set "
                           f"model.n_embd={wte.shape[1]}.")
    if wte.shape[0] != cfg.vocab_size:
        raise ConvertError(f"source tensor wte.weight has shape {tuple(wte.shape)} but the target needs "
                           f"{(cfg.vocab_size, cfg.n_embd)}: the vocabulary differs; set "
                           f"model.vocab_size={wte.shape[0]}.")
    if cfg.pos_emb == "learned":
        wpe = source.tensor("wpe.weight")
        if cfg.block_size > wpe.shape[0]:
            raise ConvertError(f"source tensor wpe.weight has shape {tuple(wpe.shape)} but "
                               f"model.block_size={cfg.block_size} needs {(cfg.block_size, cfg.n_embd)}; "
                               f"set model.block_size <= {wpe.shape[0]} (or use pos_emb='rope').")
    fc = source.tensor("h.0.mlp.c_fc.weight")
    if fc.shape[1] != cfg.hidden:
        raise ConvertError(f"source tensor h.0.mlp.c_fc.weight has shape {tuple(fc.shape)} but the target "
                           f"MLP needs {(cfg.n_embd, cfg.hidden)}; set model.mlp_hidden={fc.shape[1]}.")


class _Writer:
    """Fills the flat target tree and records every row of the report."""

    def __init__(self, source: Source, flat: dict):
        self.source, self.flat, self.rows = source, flat, []
        self.written: set[str] = set()
        # per source tensor: a 1-D mask over the axis that gets sliced, to count unused elements
        self.used: dict[str, tuple[int, np.ndarray]] = {}

    def mark(self, name: str, axis: int = 0, start: int = 0, stop: Optional[int] = None) -> None:
        shape = self.source.tensor(name).shape
        ax, mask = self.used.setdefault(name, (axis, np.zeros(shape[axis], bool)))
        if ax != axis:  # used along two different axes: count the tensor as fully used
            mask[:] = True
            return
        mask[start:stop] = True

    def put(self, target: str, value: np.ndarray, status: str, source_desc: str) -> None:
        leaf = self.flat[target]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConvertError(f"source {source_desc} gives shape {tuple(value.shape)} but target "
                               f"parameter {target} has shape {tuple(leaf.shape)}; the configs differ "
                               "in a size the mapping cannot bridge.")
        self.flat[target] = np.asarray(value, np.float32).astype(leaf.dtype)
        self.written.add(target)
        self.rows.append(Row(status, target, source_desc, int(value.size)))

    def finish(self) -> None:
        for target, leaf in self.flat.items():
            if target not in self.written:
                self.rows.append(Row("new", target, "", int(np.prod(leaf.shape))))
        for name, t in self.source.tensors.items():
            if name not in self.used:
                self.rows.append(Row("dropped", "", name, int(t.size)))
                continue
            axis, mask = self.used[name]
            unused = int(t.size // t.shape[axis] * (~mask).sum())
            if unused:
                self.rows.append(Row("dropped", "", f"{name} (unused part)", unused))


def convert_gpt2(cfg: ModelConfig, source: Source, layers: Optional[Sequence[int]] = None,
                 seed: int = 0):
    """Map `source` onto `cfg`: returns (params, Report). Unmapped params are freshly initialised."""
    import jax
    from flax import traverse_util
    from .checkpoint import abstract_params
    from .model import init_params
    _check_shapes(cfg, source)
    picked = _pick_layers(cfg, source, layers)
    E, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    # Target shapes/dtypes without allocating; fresh values are only computed if something is new.
    abstract = abstract_params(cfg)
    flat = {".".join(k): v for k, v in traverse_util.flatten_dict(abstract).items()}
    w = _Writer(source, flat)
    notes: list[str] = []
    src_tied = bool(source.config.get("tie_word_embeddings", True))

    wte = source.tensor("wte.weight")
    w.put("wte", wte, "copied", "wte.weight")
    w.mark("wte.weight")
    if src_tied and "lm_head.weight" in source.tensors:
        w.mark("lm_head.weight")  # the same matrix as wte (tied); not a separate weight
    if not cfg.tie_embeddings:
        if not src_tied and "lm_head.weight" in source.tensors:
            w.put("lm_head", source.tensor("lm_head.weight").T, "copied", "lm_head.weight.T")
            w.mark("lm_head.weight")
        else:
            w.put("lm_head", wte.T, "copied", "wte.weight.T (source head is tied)")
    elif not src_tied and "lm_head.weight" in source.tensors:
        notes.append("the source has an untied lm_head but the target ties its head to wte; "
                     "lm_head.weight is dropped.")
    if cfg.pos_emb == "learned":
        wpe = source.tensor("wpe.weight")
        sliced = cfg.block_size < wpe.shape[0]
        w.put("wpe", wpe[:cfg.block_size], "sliced" if sliced else "copied",
              f"wpe.weight[:{cfg.block_size}]" if sliced else "wpe.weight")
        w.mark("wpe.weight", 0, 0, cfg.block_size)

    def norm(target: str, src: str) -> None:
        w.put(f"{target}.scale", source.tensor(f"{src}.weight"), "copied", f"{src}.weight")
        w.mark(f"{src}.weight")
        if cfg.norm == "layernorm" and cfg.bias:
            w.put(f"{target}.bias", source.tensor(f"{src}.bias"), "copied", f"{src}.bias")
            w.mark(f"{src}.bias")

    def dense(target: str, src: str, kernel: np.ndarray, bias: np.ndarray, status: str,
              kdesc: str, bdesc: str) -> None:
        w.put(f"{target}.kernel", kernel, status, f"{src}.weight{kdesc}")
        if cfg.bias:
            w.put(f"{target}.bias", bias, status, f"{src}.bias{bdesc}")

    for i, j in enumerate(picked):
        t, s = f"h_{i}", f"h.{j}"
        n_self = cfg.layers[i].n_self
        norm(f"{t}.ln_1", f"{s}.ln_1")
        norm(f"{t}.ln_2", f"{s}.ln_2")
        # Attention. HF Conv1D stores [in, out]; c_attn's out columns are [Q | K | V], each E wide.
        # Q keeps all E columns re-cut into the target's H heads of size D; K/V keep their first
        # n_self*D columns (the target's self heads).
        ca, cb = source.tensor(f"{s}.attn.c_attn.weight"), source.tensor(f"{s}.attn.c_attn.bias")
        dense(f"{t}.attn.q", f"{s}.attn.c_attn", ca[:, :E].reshape(E, H, D), cb[:E].reshape(H, D),
              "copied", "[:, 0:d]", "[0:d]")
        kv = n_self * D
        status = "copied" if kv == E else "sliced"
        for name, lo in (("k", E), ("v", 2 * E)):
            what = "d:d+n_self*D" if name == "k" else "2d:2d+n_self*D"
            dense(f"{t}.attn.{name}", f"{s}.attn.c_attn", ca[:, lo:lo + kv].reshape(E, n_self, D),
                  cb[lo:lo + kv].reshape(n_self, D), status, f"[:, {what}]", f"[{what}]")
        w.mark(f"{s}.attn.c_attn.weight", 1, 0, E)
        w.mark(f"{s}.attn.c_attn.weight", 1, E, E + kv)
        w.mark(f"{s}.attn.c_attn.weight", 1, 2 * E, 2 * E + kv)
        if cfg.bias:
            for lo, hi in ((0, E), (E, E + kv), (2 * E, 2 * E + kv)):
                w.mark(f"{s}.attn.c_attn.bias", 0, lo, hi)
        cp, cpb = source.tensor(f"{s}.attn.c_proj.weight"), source.tensor(f"{s}.attn.c_proj.bias")
        dense(f"{t}.attn.o", f"{s}.attn.c_proj", cp.reshape(H, D, E), cpb, "copied", "", "")
        w.mark(f"{s}.attn.c_proj.weight")
        # MLP.
        fc, fcb = source.tensor(f"{s}.mlp.c_fc.weight"), source.tensor(f"{s}.mlp.c_fc.bias")
        pj, pjb = source.tensor(f"{s}.mlp.c_proj.weight"), source.tensor(f"{s}.mlp.c_proj.bias")
        if cfg.mlp == "gelu":
            dense(f"{t}.mlp.fc", f"{s}.mlp.c_fc", fc, fcb, "copied", "", "")
            dense(f"{t}.mlp.proj", f"{s}.mlp.c_proj", pj, pjb, "copied", "", "")
        else:
            a = SWIGLU_ALPHA
            dense(f"{t}.mlp.gate", f"{s}.mlp.c_fc", a * fc, a * fcb, "copied", f" x {a}", f" x {a}")
            if cfg.bias:
                w.put(f"{t}.mlp.up.kernel", np.zeros_like(fc), "constant", "zeros")
                w.put(f"{t}.mlp.up.bias", np.full_like(fcb, 1.0 / a), "constant", f"1/{a}")
            dense(f"{t}.mlp.down", f"{s}.mlp.c_proj", pj, pjb, "copied", "", "")
        w.mark(f"{s}.mlp.c_fc.weight")
        w.mark(f"{s}.mlp.c_proj.weight")
        if cfg.bias:
            for b in ("attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
                w.mark(f"{s}.{b}")
    norm("ln_f", "ln_f")
    w.finish()

    act = source.config.get("activation_function", "gelu_new")
    if cfg.mlp == "swiglu":
        notes.append(f"SwiGLU from GELU: gate = {SWIGLU_ALPHA} * c_fc, up = zero kernel + bias "
                     f"1/{SWIGLU_ALPHA}, down = c_proj; each hidden unit becomes z*sigmoid("
                     f"{SWIGLU_ALPHA}z) ~ gelu(z) (|error| <= 0.021 per unit).")
        if not cfg.bias:
            notes.append("model.bias=False: SwiGLU's up needs the constant bias 1/1.702, so up is "
                         "freshly initialised and the MLP function is NOT preserved; set "
                         "model.bias=True to keep it.")
    if act not in _GELU_TANH:
        notes.append(f"the source's activation is {act!r}; the target computes tanh-approximate gelu, "
                     "so MLP outputs differ slightly.")
    if cfg.norm == "rmsnorm":
        notes.append("rmsnorm: scale <- LayerNorm weight; LayerNorm biases and mean-centering dropped.")
    if not cfg.bias:
        notes.append("model.bias=False: every source bias is dropped.")
    if H != source.n_head:
        notes.append(f"model.n_head={H} differs from the source's {source.n_head}: Q/K/V columns are "
                     f"re-cut into heads of size {D}, so attention patterns change.")
    if cfg.pos_emb == "rope":
        notes.append("pos_emb='rope': the learned position table wpe.weight is dropped.")
    eps = float(source.config.get("layer_norm_epsilon", 1e-5))
    if abs(eps - cfg.norm_eps) > 1e-12:
        notes.append(f"model.norm_eps={cfg.norm_eps} differs from the source's {eps}.")
    for flag, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)):
        if source.config.get(flag, not bad) == bad:
            notes.append(f"the source sets {flag}={bad}; the target always scales by 1/sqrt(D), so "
                         "attention differs.")

    if len(w.written) < len(w.flat):
        fresh = jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(seed))
        fresh = traverse_util.flatten_dict(fresh)
        for key, value in fresh.items():
            if ".".join(key) not in w.written:
                w.flat[".".join(key)] = value
    params = traverse_util.unflatten_dict({tuple(k.split(".")): jax.numpy.asarray(v)
                                           for k, v in w.flat.items()})
    report = Report(source.describe(), cfg.schedule_table(), picked, w.rows, notes)
    return params, report


def convert_to_dir(hf: str, cfg: ModelConfig, out: str, layers: Optional[Sequence[int]] = None,
                   seed: int = 0):
    """Load `hf`, convert it onto `cfg` and save a params directory at `out`. Returns the Report."""
    from .checkpoint import save_params
    source = load_gpt2(hf)
    params, report = convert_gpt2(cfg, source, layers, seed)
    meta = {"source": source.hub_id or source.directory, "source_dir": source.directory, "source_files": source.files,
            "source_config": {k: source.config.get(k) for k in
                              ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
                               "activation_function", "layer_norm_epsilon")},
            "layers": report.layers, "seed": seed, "totals": report.totals(), "notes": report.notes}
    if cfg.mlp == "swiglu":
        meta["swiglu_alpha"] = SWIGLU_ALPHA
    if source.tokenizer:
        meta["tokenizer"] = source.tokenizer
    save_params(out, cfg, params, meta)
    return report


__all__ = ["ConvertError", "Source", "Report", "Row", "SWIGLU_ALPHA", "load_gpt2", "matching_config",
           "parse_layers", "convert_gpt2", "convert_to_dir"]
