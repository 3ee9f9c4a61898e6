"""HF Llama-family checkpoints (model_type llama, mistral, qwen2) -> params for any reflex
`ModelConfig` (the mapping, what is accepted and what is refused: docs/convert.md#llama-family-checkpoints).

    source = load_llama("Qwen/Qwen2-0.5B")                    # or a local HF directory
    params, report = convert_llama(equivalent_config(source), source)   # exact: none or gqa:G
    params, report = convert_llama(equivalent_config(source, head_plan="all"), source)

These models are this project's decoder with RMSNorm, SwiGLU, RoPE and no position table: RoPE is
HF's rotate_half (half-split) layout here as there, so q_proj/k_proj rows need no permutation.
What the model cannot compute (rope scaling, a sliding window shorter than block_size, another
head size or activation) is refused in one sentence; biases it lacks are zeros under bias=True.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from ..errors import ConvertError
from ..model import LayerPlan, ModelConfig
from ..model.route import ROUTE_INIT_LOGIT, route_init_logits
from .hf_gpt2 import pick_layers
from .hf_source import Source, open_checkpoint, read_tensors
from .report import ParamWriter, Report

LLAMA_TYPES = ("llama", "mistral", "qwen2")
# HF's defaults for the settings a config.json may leave out, per model_type
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, sliding_window=None),
    "mistral": dict(max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, sliding_window=4096),
}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
             "vocab_size")
_LAYER_TENSOR = re.compile(r"layers\.(\d+)\.(.+)")
_ACTIVATIONS = ("silu", "swish")  # the same function in HF's ACT2FN


class LlamaSource(Source):
    """A Llama-family checkpoint: tensors named without the `model.` prefix (`embed_tokens.weight`,
    `layers.0.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`); nn.Linear is [out, in]."""
    family = "Llama-family"
    layer_prefix = "layers"

    def get(self, key: str):
        """A config.json setting (null included), else HF's default for this model_type."""
        if key in self.config:
            return self.config[key]
        return _DEFAULTS[self.model_type].get(key)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_kv_head(self) -> int:
        return int(self.get("num_key_value_heads") or self.n_head)

    @property
    def n_embd(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def group(self) -> int:
        """Query heads per K/V head (HF repeat_kv: query head h reads K/V head h // group)."""
        return self.n_head // self.n_kv_head

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def eps(self) -> float:
        return float(self.config.get("rms_norm_eps", 1e-6))

    @property
    def rope_theta(self) -> float:
        params = self.config.get("rope_parameters") or {}
        return float(params.get("rope_theta", self.config.get("rope_theta", 10000.0)))

    @property
    def max_positions(self) -> int:
        return int(self.get("max_position_embeddings") or _DEFAULTS[self.model_type][
            "max_position_embeddings"])

    @property
    def window(self) -> Optional[int]:
        """The sliding window some layer attends within, or None (every layer attends to all)."""
        if self.model_type == "mistral":
            w = self.get("sliding_window")
        elif self.model_type == "qwen2" and self.config.get("use_sliding_window"):
            w = self.get("sliding_window")
            first = int(self.config.get("max_window_layers", 28))
            kinds = self.config.get("layer_types") or [
                "sliding_attention" if w is not None and i >= first else "full_attention"
                for i in range(int(self.config["num_hidden_layers"]))]
            if "sliding_attention" not in kinds:
                w = None
        else:  # llama has none; qwen2 without use_sliding_window ignores sliding_window
            w = None
        return None if w is None else int(w)

    def biases(self) -> dict[str, bool]:
        """Which projections carry a bias, as the model_type's HF code builds them."""
        if self.model_type == "qwen2":
            qkv, o, mlp = True, False, False
        elif self.model_type == "llama":
            qkv = o = bool(self.config.get("attention_bias", False))
            mlp = bool(self.config.get("mlp_bias", False))
        else:
            qkv = o = mlp = False
        return {"q_proj": qkv, "k_proj": qkv, "v_proj": qkv, "o_proj": o,
                "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp}

    def describe(self) -> str:
        kv = f" on {self.n_kv_head} K/V heads" if self.n_kv_head != self.n_head else ""
        return (f"{self.where} ({', '.join(self.files)}): {self.model_type}, {self.n_layer} layers x "
                f"{self.n_head} heads{kv}, hidden {self.n_embd}, intermediate "
                f"{self.config['intermediate_size']}, vocab {self.config['vocab_size']}, "
                f"rope_theta {self.rope_theta:g}")


# ---- reading and refusing -------------------------------------------------------------------------

def load_llama(hf: str) -> LlamaSource:
    """Read a Llama-family checkpoint from a local directory or a hub id (never trust_remote_code)."""
    directory, hub_id, config = open_checkpoint(hf)
    return llama_source(hf, directory, hub_id, config)


def llama_source(hf: str, directory: str, hub_id: Optional[str], config: dict) -> LlamaSource:
    """The LlamaSource of an opened checkpoint: its config.json checked first (what the model
    cannot compute is refused before any weight is read), then every tensor's shape."""
    check_config(hf, config)
    files, stored = read_tensors(directory)
    tensors = {}
    for k, v in stored.items():
        k = k[len("model."):] if k.startswith("model.") else k
        if k.endswith("rotary_emb.inv_freq"):  # a buffer of older checkpoints, not a weight
            continue
        tensors[k] = v
    source = LlamaSource(hf, directory, hub_id, config, tensors, files)
    if source.tied and "embed_tokens.weight" not in tensors and "lm_head.weight" in tensors:
        # safetensors stores a tied matrix once, under either name
        tensors["embed_tokens.weight"] = tensors.pop("lm_head.weight")
    check_shapes(source)
    return source


def check_config(hf: str, config: dict) -> None:
    """One sentence naming the config.json field for anything this model cannot compute."""
    kind = config.get("model_type")
    if kind not in LLAMA_TYPES:
        raise ConvertError(f"{hf!r} is a {kind!r} model (config.json model_type); the Llama-family "
                           f"import reads model_type {', '.join(LLAMA_TYPES)} only.")
    missing = [k for k in _REQUIRED if config.get(k) is None]
    if missing:
        raise ConvertError(f"config.json of {hf!r} lacks {', '.join(missing)}; it is not a complete "
                           f"{kind} config, so download or re-save the checkpoint.")
    cannot = "so this checkpoint cannot be converted exactly"
    if config.get("quantization_config"):
        raise ConvertError(f"config.json quantization_config: {hf!r} holds quantized weights, which "
                           "are not read; convert the unquantized checkpoint.")
    act = config.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ConvertError(f"config.json hidden_act={act!r}: the model's SwiGLU computes silu(gate) "
                           f"* up only, {cannot}.")
    E, H = int(config["hidden_size"]), int(config["num_attention_heads"])
    if E % H:
        raise ConvertError(f"config.json hidden_size={E} is not divisible by num_attention_heads={H}; "
                           "the checkpoint is damaged, so download or re-save it.")
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != E // H:
        raise ConvertError(f"config.json head_dim={head_dim} differs from hidden_size/"
                           f"num_attention_heads={E // H}, and the model's head size is always "
                           f"n_embd/n_head, {cannot}.")
    _check_rope(config, cannot)
    kinds = config.get("layer_types") or []
    odd = sorted({t for t in kinds if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise ConvertError(f"config.json layer_types holds {odd[0]!r}: the model computes full "
                           f"causal attention only, {cannot}.")


def _check_rope(config: dict, cannot: str) -> None:
    """Plain RoPE only: rope_parameters (transformers 5) or rope_scaling (earlier) of type
    default, and the rotation over the whole head."""
    for field in ("rope_parameters", "rope_scaling"):
        params = config.get(field)
        if not params:
            continue
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConvertError(f"config.json {field}={params!r} is not one set of RoPE settings; "
                               f"the model computes one plain RoPE for every layer, {cannot}.")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise ConvertError(f"config.json {field}.rope_type={kind!r}: the model computes plain "
                               f"RoPE (rope_type 'default') only, {cannot}.")
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if float(partial) != 1.0:
            raise ConvertError(f"config.json partial_rotary_factor={partial}: the model rotates the "
                               f"whole head, {cannot}.")


def expected_shapes(source: LlamaSource) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, the config.json values that imply it) per tensor name present; nn.Linear is
    [out, in]. Biases are expected where the model_type's HF code builds them."""
    E, V, H, K = source.n_embd, int(source.config["vocab_size"]), source.n_head, source.n_kv_head
    D, F = source.head_dim, int(source.config["intermediate_size"])
    e, ve = f"hidden_size={E}", f"vocab_size={V}, hidden_size={E}"
    qe = f"hidden_size={E}, num_attention_heads={H}"
    ke = f"{qe}, num_key_value_heads={K}"
    fe = f"hidden_size={E}, intermediate_size={F}"
    top = {"embed_tokens.weight": ((V, E), ve), "lm_head.weight": ((V, E), ve),
           "norm.weight": ((E,), e)}
    block = {"input_layernorm.weight": ((E,), e), "post_attention_layernorm.weight": ((E,), e),
             "self_attn.q_proj.weight": ((H * D, E), qe), "self_attn.q_proj.bias": ((H * D,), qe),
             "self_attn.k_proj.weight": ((K * D, E), ke), "self_attn.k_proj.bias": ((K * D,), ke),
             "self_attn.v_proj.weight": ((K * D, E), ke), "self_attn.v_proj.bias": ((K * D,), ke),
             "self_attn.o_proj.weight": ((E, H * D), qe), "self_attn.o_proj.bias": ((E,), e),
             "mlp.gate_proj.weight": ((F, E), fe), "mlp.gate_proj.bias": ((F,), fe),
             "mlp.up_proj.weight": ((F, E), fe), "mlp.up_proj.bias": ((F,), fe),
             "mlp.down_proj.weight": ((E, F), fe), "mlp.down_proj.bias": ((E,), e)}
    out = {}
    for name in source.tensors:
        m = _LAYER_TENSOR.fullmatch(name)
        if name in top:
            out[name] = top[name]
        elif m and m.group(2) in block:
            out[name] = block[m.group(2)]
    return out


def check_shapes(source: LlamaSource) -> None:
    """Every tensor the mapping reads has the shape config.json implies, no layer lies beyond
    num_hidden_layers, and H is a multiple of the K/V heads."""
    fix = (f"the checkpoint in {source.where!r} is damaged or does not match its config.json; "
           "download it again or re-save it with save_pretrained.")
    if source.n_head % source.n_kv_head:
        raise ConvertError(f"config.json num_attention_heads={source.n_head} is not a multiple of "
                           f"num_key_value_heads={source.n_kv_head}; {fix}")
    for name, (shape, why) in expected_shapes(source).items():
        got = tuple(source.tensors[name].shape)
        if got != shape:
            raise ConvertError(f"source tensor {name} has shape {got} but config.json ({why}) "
                               f"implies {shape}; {fix}")
    n_layer = int(source.config["num_hidden_layers"])
    for name in source.tensors:
        m = _LAYER_TENSOR.fullmatch(name)
        if m and int(m.group(1)) >= n_layer:
            raise ConvertError(f"source tensor {name} belongs to layer {m.group(1)} but config.json "
                               f"has num_hidden_layers={n_layer} (layers 0..{n_layer - 1}); {fix}")


def equivalent_config(source: LlamaSource, **overrides) -> ModelConfig:
    """The ModelConfig that computes exactly what `source` does (fields overridable): `none`, or
    `gqa:G` for grouped K/V heads. With a sliding window shorter than max_position_embeddings,
    block_size is the window (within it the window never applies)."""
    check_shapes(source)
    H, K = source.n_head, source.n_kv_head
    block = source.max_positions
    if source.window is not None:
        block = min(block, source.window)
    fields = dict(vocab_size=int(source.config["vocab_size"]), block_size=block,
                  n_layer=source.n_layer, n_head=H, n_embd=source.n_embd,
                  mlp_hidden=int(source.config["intermediate_size"]), norm="rmsnorm",
                  norm_eps=source.eps, mlp="swiglu", bias=any(source.biases().values()),
                  pos_emb="rope", rope_theta=source.rope_theta, tie_embeddings=source.tied,
                  dropout=0.0, head_plan="none" if K == H else f"gqa:{H // K}")
    fields.update(overrides)
    return ModelConfig(**fields)


def _check_target(cfg: ModelConfig, source: LlamaSource) -> None:
    """What the target must share with the source for the weights to fit, one sentence each."""
    embed = source.tensor("embed_tokens.weight")
    need = (cfg.vocab_size, cfg.n_embd)
    if embed.shape[1] != cfg.n_embd:
        raise ConvertError(f"source tensor embed_tokens.weight has shape {tuple(embed.shape)} but the "
                           f"target needs {need}: n_embd differs; set model.n_embd={embed.shape[1]}.")
    if embed.shape[0] != cfg.vocab_size:
        raise ConvertError(f"source tensor embed_tokens.weight has shape {tuple(embed.shape)} but the "
                           f"target needs {need}: the vocabulary differs; set "
                           f"model.vocab_size={embed.shape[0]}.")
    if cfg.n_head != source.n_head:
        raise ConvertError(f"model.n_head={cfg.n_head} differs from the source's {source.n_head} heads "
                           f"of size {source.head_dim}, and RoPE rotates within a head, so the heads "
                           f"cannot be re-cut; set model.n_head={source.n_head}.")
    if cfg.mlp != "swiglu":
        raise ConvertError(f"model.mlp={cfg.mlp!r} cannot hold the source's SwiGLU MLP (gate_proj, "
                           "up_proj, down_proj); set model.mlp='swiglu'.")
    gate = source.tensor("layers.0.mlp.gate_proj.weight")
    if gate.shape[0] != cfg.hidden:
        raise ConvertError(f"source tensor layers.0.mlp.gate_proj.weight has shape "
                           f"{tuple(gate.shape)} but the target MLP needs {(cfg.hidden, cfg.n_embd)}; "
                           f"set model.mlp_hidden={gate.shape[0]}.")
    if cfg.pos_emb != "rope":
        raise ConvertError(f"model.pos_emb={cfg.pos_emb!r} adds a position table the source does not "
                           "have (it rotates Q and K with RoPE); set model.pos_emb='rope'.")
    w = source.window
    if w is not None and cfg.block_size > w:
        raise ConvertError(f"config.json sliding_window={w}: the source attends to its last {w} "
                           f"tokens only, which model.block_size={cfg.block_size} would exceed, and "
                           f"this model has no sliding window; set model.block_size={w} or less.")


# ---- the mapping ------------------------------------------------------------------------------

def convert_llama(cfg: ModelConfig, source: LlamaSource, layers: Optional[Sequence[int]] = None,
                  seed: int = 0):
    """Map `source` onto `cfg`: returns (params, Report). Unmapped params are freshly initialised."""
    from flax import traverse_util
    from ..model import abstract_params
    check_shapes(source)
    _check_target(cfg, source)
    picked = pick_layers(cfg, source, layers)
    flat = {".".join(k): v for k, v in traverse_util.flatten_dict(abstract_params(cfg)).items()}
    w = ParamWriter(source, flat)
    notes = _map_embeddings(w, cfg, source)
    for i, j in enumerate(picked):
        _map_block(w, cfg, source, f"h_{i}", f"layers.{j}", cfg.layers[i])
    _map_norm(w, cfg, "ln_f", "norm")
    w.finish()
    notes += _conversion_notes(cfg, source) + _plan_notes(cfg, source)
    report = Report(source.describe(), cfg.schedule_table(), picked, w.rows, notes,
                    source_layer="layers")
    return w.params(cfg, seed), report


def _map_embeddings(w: ParamWriter, cfg: ModelConfig, source: LlamaSource) -> list[str]:
    notes = []
    embed = source.tensor("embed_tokens.weight")
    w.put("wte", embed, "copied", "embed_tokens.weight")
    w.mark("embed_tokens.weight")
    if source.tied and "lm_head.weight" in source.tensors:
        w.mark("lm_head.weight")  # the same matrix as embed_tokens (tied), when stored twice
    if not cfg.tie_embeddings:
        if source.tied:
            w.put("lm_head", embed.T, "copied", "embed_tokens.weight.T (source head is tied)")
        else:
            w.put("lm_head", source.tensor("lm_head.weight").T, "copied", "lm_head.weight.T")
            w.mark("lm_head.weight")
    elif not source.tied:
        notes.append("the source has an untied lm_head but the target ties its head to wte; "
                     "lm_head.weight is dropped, so the logits change.")
    return notes


def _map_norm(w: ParamWriter, cfg: ModelConfig, target: str, src: str) -> None:
    w.put(f"{target}.scale", w.source.tensor(f"{src}.weight"), "copied", f"{src}.weight")
    w.mark(f"{src}.weight")
    if cfg.norm == "layernorm" and cfg.bias:
        w.put(f"{target}.bias", np.zeros(cfg.n_embd), "constant", "zeros (RMSNorm has no bias)")


def _map_bias(w: ParamWriter, cfg: ModelConfig, target: str, name: str, value, desc: str,
              status: str, shape, spans=((None, None),)) -> None:
    """The source's bias (`value`, already cut from the `spans` of `name`.bias) where it has
    one, zeros where it has none; nothing without model.bias (the source's bias is dropped)."""
    if not cfg.bias:
        return
    if value is None:
        w.put(f"{target}.bias", np.zeros(shape), "constant",
              f"zeros (the source has no {name.rsplit('.', 1)[1]} bias)")
        return
    w.put(f"{target}.bias", value, status, desc)
    for start, stop in spans:
        w.mark(f"{name}.bias", 0, start or 0, stop)


def _map_block(w: ParamWriter, cfg: ModelConfig, source: LlamaSource, t: str, s: str,
               plan: LayerPlan) -> None:
    """Target block `t` (e.g. h_0) from source block `s` (e.g. layers.4)."""
    _map_norm(w, cfg, f"{t}.ln_1", f"{s}.input_layernorm")
    _map_norm(w, cfg, f"{t}.ln_2", f"{s}.post_attention_layernorm")
    _map_attention(w, cfg, source, t, s, plan)
    biased = source.biases()
    for proj, target in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        name = f"{s}.mlp.{proj}"
        weight = source.tensor(f"{name}.weight")
        w.put(f"{t}.mlp.{target}.kernel", weight.T, "copied", f"{name}.weight.T")
        w.mark(f"{name}.weight")
        bias = source.tensor(f"{name}.bias") if biased[proj] else None
        _map_bias(w, cfg, f"{t}.mlp.{target}", name, bias, f"{name}.bias", "copied",
                  weight.shape[0])


def kv_source_heads(plan: LayerPlan, group: int) -> tuple[list[int], list[int]]:
    """(source K/V head of each target K head, of each target V head). A target K/V head takes
    the source K/V head of its first query head (query head h reads source K/V head h // group),
    which is exact for every target group that lies inside one source group; a share-V cross
    head's own K takes its own query head's."""
    first: dict[int, int] = {}
    for h, j in enumerate(plan.self_kv_heads):
        first.setdefault(j, h)
    exported = [first[j] // group for j in range(plan.n_kv)]
    own_k, q = [], plan.n_self
    for g in plan.cross:  # share-V heads' own K follow the exported heads, in group order
        if g.share == "v":
            own_k += [(q + i) // group for i in range(g.n_heads)]
        q += g.n_heads
    return exported + own_k, exported


def _map_attention(w: ParamWriter, cfg: ModelConfig, source: LlamaSource, t: str, s: str,
                   plan: LayerPlan) -> None:
    """q keeps q_proj's first n_query heads, k and v the source K/V head each of their heads
    reads (kv_source_heads), o the o_proj columns of the kept query heads."""
    E, D, K = cfg.n_embd, cfg.head_dim, source.n_kv_head
    biased = source.biases()
    a = f"{s}.self_attn"
    rows = plan.n_query * D
    whole = plan.n_query == cfg.n_head
    q, cut = source.tensor(f"{a}.q_proj.weight"), "" if whole else f"[0:{rows}]"
    status = "copied" if whole else "sliced"
    w.put(f"{t}.attn.q.kernel", q[:rows].T.reshape(E, plan.n_query, D), status,
          f"{a}.q_proj.weight{cut}.T")
    w.mark(f"{a}.q_proj.weight", 0, 0, rows)
    bias = source.tensor(f"{a}.q_proj.bias")[:rows].reshape(plan.n_query, D) if biased["q_proj"] \
        else None
    _map_bias(w, cfg, f"{t}.attn.q", f"{a}.q_proj", bias, f"{a}.q_proj.bias{cut}", status,
              (plan.n_query, D), [(0, rows)])
    k_heads, v_heads = kv_source_heads(plan, source.group)
    for proj, target, heads in (("k_proj", "k", k_heads), ("v_proj", "v", v_heads)):
        if not heads:
            continue
        name, idx = f"{a}.{proj}", np.asarray(heads)
        same = heads == list(range(K))
        status = "copied" if same else "sliced"
        cut = "" if same else f"[K/V heads {','.join(map(str, heads))}]"
        weight = source.tensor(f"{name}.weight").reshape(K, D, E)[idx]
        w.put(f"{t}.attn.{target}.kernel", weight.transpose(2, 0, 1), status,
              f"{name}.weight{cut}.T")
        bias = source.tensor(f"{name}.bias").reshape(K, D)[idx] if biased[proj] else None
        spans = [(head * D, (head + 1) * D) for head in sorted(set(heads))]
        _map_bias(w, cfg, f"{t}.attn.{target}", name, bias, f"{name}.bias{cut}", status,
                  (len(heads), D), spans)
        for start, stop in spans:
            w.mark(f"{name}.weight", 0, start, stop)
    o, cut = source.tensor(f"{a}.o_proj.weight"), "" if whole else f"[:, 0:{rows}]"
    status = "copied" if whole else "sliced"
    w.put(f"{t}.attn.o.kernel", o[:, :rows].T.reshape(plan.n_query, D, E), status,
          f"{a}.o_proj.weight{cut}.T")
    w.mark(f"{a}.o_proj.weight", 1, 0, rows)
    bias = source.tensor(f"{a}.o_proj.bias") if biased["o_proj"] else None
    _map_bias(w, cfg, f"{t}.attn.o", f"{a}.o_proj", bias, f"{a}.o_proj.bias", "copied", (E,))
    if cfg.value_residual and plan.layer and plan.n_v:
        w.put(f"{t}.attn.value_mix", np.array([1.0, 0.0]), "constant", "1, 0 (the layer's own V)")
    if plan.routed:
        w.put(f"{t}.attn.route_logits", route_init_logits(plan), "constant",
              f"{ROUTE_INIT_LOGIT:g} at all's source, 0 elsewhere")


# ---- the notes: where the target computes something other than the source -------------------------

def _conversion_notes(cfg: ModelConfig, source: LlamaSource) -> list[str]:
    notes = []
    if cfg.norm == "layernorm":
        notes.append("model.norm='layernorm': the RMSNorm weights become LayerNorm scales, so "
                     "mean-centering is added and the function changes.")
    if abs(cfg.norm_eps - source.eps) > 1e-12:
        notes.append(f"model.norm_eps={cfg.norm_eps} differs from the source's rms_norm_eps "
                     f"{source.eps}.")
    if cfg.rope_theta != source.rope_theta:
        notes.append(f"model.rope_theta={cfg.rope_theta:g} differs from the source's "
                     f"{source.rope_theta:g}, so every position's rotation changes.")
    biased = [p for p, b in source.biases().items() if b]
    if biased and not cfg.bias:
        notes.append(f"model.bias=False: the source's {', '.join(biased)} biases are dropped, so "
                     "the function changes.")
    unbiased = [p for p, b in source.biases().items() if not b]
    if cfg.bias and unbiased:
        notes.append(f"model.bias=True: the source has no {', '.join(unbiased)} biases, so they are "
                     "zeros (the function is unchanged; training may move them).")
    if cfg.block_size > source.max_positions:
        notes.append(f"model.block_size={cfg.block_size} exceeds the source's "
                     f"max_position_embeddings={source.max_positions}: later positions were never "
                     "trained.")
    if source.window is not None:
        notes.append(f"the source's sliding window ({source.window} tokens) never applies within "
                     f"model.block_size={cfg.block_size}, so attention is the same.")
    return notes


def _plan_notes(cfg: ModelConfig, source: LlamaSource) -> list[str]:
    """What the target's head plan changes against the source's attention."""
    notes, plans, G = [], cfg.layers, source.group
    borrowing = [p.layer for p in plans if not p.n_kv]
    if borrowing:
        notes.append(f"layers {', '.join(map(str, borrowing))} borrow every head's K/V from an "
                     "earlier layer and have no K/V projection: the k_proj/v_proj of the source "
                     "layers mapped onto them are dropped.")
    crossing = [p.layer for p in plans if p.n_cross]
    if crossing:
        notes.append(f"layers {', '.join(map(str, crossing))} have cross heads: each keeps its "
                     "source Q and o_proj weights but reads an earlier layer's K/V, so attention "
                     "changes there until fine-tuning.")
    regrouped = []
    for p in plans:
        exported, _ = kv_source_heads(p, G)
        if any(exported[j] != h // G for h, j in enumerate(p.self_kv_heads)):
            regrouped.append(p.layer)
    if regrouped:
        notes.append(f"layers {', '.join(map(str, regrouped))} group their self heads on K/V heads "
                     f"across the source's groups of {G}: each K/V head is the source K/V head of "
                     "its first query head, so attention changes for the others.")
    if any(p.n_query != cfg.n_head for p in plans):
        notes.append("layers with fewer query heads keep the source's first n_query Q heads and "
                     "their o_proj columns; the other heads are dropped.")
    if any(p.n_own_k for p in plans):
        notes.append("share-V cross heads take their own K from the source K/V head of their query "
                     "head and read an earlier layer's V.")
    if any(p.routed for p in plans):
        notes.append(f"route: route_logits start as in training ({ROUTE_INIT_LOGIT:g} for the source "
                     "'all' gives each cross head, 0 for the others).")
    if cfg.value_residual:
        notes.append("value_residual: value_mix is set to (1, 0), so every layer starts with its own "
                     "V, as in the source.")
    return notes


SOURCE_CONFIG_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings",
                      "rms_norm_eps", "tie_word_embeddings", "sliding_window")


def source_config(source: LlamaSource) -> dict:
    """The config.json settings meta.json records (rope_theta resolved from either spelling)."""
    return {**{k: source.config.get(k) for k in SOURCE_CONFIG_KEYS},
            "rope_theta": source.rope_theta}


__all__ = ["LLAMA_TYPES", "LlamaSource", "load_llama", "llama_source", "check_config",
           "check_shapes", "equivalent_config", "convert_llama", "kv_source_heads", "source_config"]
