"""Export a model as a transformers `trust_remote_code` directory (docs/export.md).

`write_hf(cfg, params, out)` writes what `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)` loads: config.json (every ModelConfig field plus the resolved per-layer
head plan), model.safetensors (the params in their param dtype, under PyTorch names), the
PyTorch port of the decoder (hf_remote/*.py, copied as they are), generation_config.json (greedy,
as sample.py decodes) and, when asked, the tokenizer with the training template as its chat
template.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from typing import Optional

import numpy as np

from ..errors import ConvertError
from ..model import ModelConfig

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
CONFIG_FILE, MODELING_FILE = "configuration_reflex_jax.py", "modeling_reflex_jax.py"
WEIGHTS, META, GENERATION = "model.safetensors", "reflex_meta.json", "generation_config.json"
# set while transformers is imported: its "PyTorch was not found" advice is logged as advisory
NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
AUTO_MAP = {"AutoConfig": "configuration_reflex_jax.ReflexJaxConfig",
            "AutoModelForCausalLM": "modeling_reflex_jax.ReflexJaxForCausalLM"}

# What the PyTorch port implements. Schedule fields reach it through the resolved plan, the
# attention backend and dropout do not change an inference forward pass.
SUPPORTED = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"),
             "pos_emb": ("learned", "rope")}
KNOWN_FIELDS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "norm",
                "norm_eps", "mlp", "bias", "pos_emb", "rope_theta", "tie_embeddings", "dropout",
                "dtype", "param_dtype", "head_plan", "reflex_window", "reflex_min_self", "attention",
                "value_residual", "scan_layers"}
# Plan fields the port reads (every head plan of model/plans.py); a plan field it does not know
# must keep its default.
PLAN_FIELDS = {"layer", "n_self", "cross", "n_kv"}
GROUP_FIELDS = {"source", "n_heads", "source_heads", "share", "mixture"}


def check_supported(cfg: ModelConfig) -> None:
    """Raise ConvertError, one sentence, for anything in `cfg` the PyTorch port cannot compute
    (the port covers every head plan of model/plans.py and value_residual)."""
    for name, allowed in SUPPORTED.items():
        if getattr(cfg, name) not in allowed:
            raise ConvertError(f"the HF export does not support model.{name}="
                               f"{getattr(cfg, name)!r}; it ports {' | '.join(allowed)} only.")
    for f in dataclasses.fields(cfg):
        if f.name not in KNOWN_FIELDS and getattr(cfg, f.name) != f.default:
            raise ConvertError(f"the HF export does not support model.{f.name}="
                               f"{getattr(cfg, f.name)!r}; export a model that leaves it at its "
                               f"default {f.default!r}.")
    for plan in cfg.layers:
        problem = _plan_problem(cfg, plan)
        if problem:
            raise ConvertError(f"the HF export does not support model.head_plan={cfg.head_plan!r}: "
                               f"layer {plan.layer} {problem}; the PyTorch port covers the head "
                               "plans of docs/attention.md#head-plans only.")


def _plan_problem(cfg: ModelConfig, plan) -> Optional[str]:
    for obj, known in [(plan, PLAN_FIELDS)] + [(g, GROUP_FIELDS) for g in plan.cross]:
        for f in dataclasses.fields(obj):
            if f.name not in known and getattr(obj, f.name) != f.default:
                return f"sets {f.name}={getattr(obj, f.name)!r}"
    return None


def layer_plan(cfg: ModelConfig) -> list[dict]:
    """The resolved head split of every layer, as config.json stores it."""
    return [{"layer": p.layer, "n_self": p.n_self, "n_kv": p.n_kv,
             "self_kv_heads": list(p.self_kv_heads),
             "cross": [{"source": g.source, "n_heads": g.n_heads, "source_heads": list(g.source_heads),
                        "share": g.share, "mixture": [list(m) for m in g.mixture]} for g in p.cross]}
            for p in cfg.layers]


def hf_config(cfg: ModelConfig, special_ids: dict) -> dict:
    return {"model_type": "reflex_jax", "architectures": ["ReflexJaxForCausalLM"],
            "auto_map": AUTO_MAP, "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "max_position_embeddings": cfg.block_size, "intermediate_size": cfg.hidden,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
            "dtype": cfg.param_dtype, **special_ids,
            "reflex_model": cfg.to_dict(), "layer_plan": layer_plan(cfg)}


def generation_config(cfg: ModelConfig, special_ids: dict) -> dict:
    """generate()'s defaults: greedy (sample.py's default), stopping at the tokenizer's eos or at
    the model's block_size (what positions it has), padding with its pad."""
    return {"do_sample": False, "max_length": cfg.block_size, **special_ids}


def _linear(kernel, n_in: int) -> np.ndarray:
    """A flax kernel (input axes first) as a torch Linear weight [out, in]."""
    k = np.asarray(kernel)
    return k.reshape(math.prod(k.shape[:n_in]), -1).T


def _norm(tensors: dict, prefix: str, p: dict) -> None:
    tensors[f"{prefix}.weight"] = np.asarray(p["scale"])
    if "bias" in p:
        tensors[f"{prefix}.bias"] = np.asarray(p["bias"])


def _dense(tensors: dict, prefix: str, p: dict, n_in: int = 1) -> None:
    tensors[f"{prefix}.weight"] = _linear(p["kernel"], n_in)
    if "bias" in p:
        tensors[f"{prefix}.bias"] = np.asarray(p["bias"]).reshape(-1)


def hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """The params under the modeling file's names (docs/export.md#tensor-names)."""
    t = {"model.wte.weight": np.asarray(params["wte"])}
    if cfg.pos_emb == "learned":
        t["model.wpe.weight"] = np.asarray(params["wpe"])
    mlp = ("fc", "proj") if cfg.mlp == "gelu" else ("gate", "up", "down")
    for i in range(cfg.n_layer):
        block, pre = params[f"h_{i}"], f"model.layers.{i}"
        _norm(t, f"{pre}.ln_1", block["ln_1"])
        _norm(t, f"{pre}.ln_2", block["ln_2"])
        attn = block["attn"]
        for name in ("q", "k", "v"):
            if name in attn:  # a borrowing layer has no K/V projection
                _dense(t, f"{pre}.attn.{name}", attn[name])
        _dense(t, f"{pre}.attn.o", attn["o"], n_in=2)
        for name in ("route_logits", "value_mix"):
            if name in attn:
                t[f"{pre}.attn.{name}"] = np.asarray(attn[name])
        for name in mlp:
            _dense(t, f"{pre}.mlp.{name}", block["mlp"][name])
    _norm(t, "model.ln_f", params["ln_f"])
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = _linear(params["lm_head"], 1)
    dtype = np.dtype(cfg.params_dtype)
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in t.items()}


def write_hf(cfg: ModelConfig, params, out: str, *, tokenizer: Optional[str] = None,
             template: Optional[str] = None, meta: Optional[dict] = None) -> str:
    """Write the transformers directory `out` (see the module docstring); returns its path.

    `tokenizer` is what `reflex_jax.data.load_tokenizer` takes ('bytes', a tokenizer directory
    or a hub id); its files are saved next to the weights, with `template` (the run's training
    template, data/templates.py) as its chat template when it asks a question. `meta`
    (provenance) goes to reflex_meta.json.
    """
    from ..checkpoint import check_params_fit
    from ..storage import is_remote
    check_supported(cfg)
    if is_remote(out):
        raise ConvertError(f"the HF export directory {out!r} is a bucket path; write it to a "
                           "local directory (transformers loads it from disk).")
    check_params_fit(cfg, params, "the exported params")
    tensors = hf_tensors(cfg, params)
    tok = hf_tokenizer(tokenizer, cfg) if tokenizer else None  # refuse before writing anything
    os.makedirs(out, exist_ok=True)
    special_ids = {}
    if tok is not None:
        from ..data.templates import chat_template
        tok.chat_template = chat_template(template)
        tok.save_pretrained(out)
        special_ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                       "pad_token_id": tok.pad_token_id}
    with open(os.path.join(out, GENERATION), "w", encoding="utf-8") as f:
        json.dump(generation_config(cfg, special_ids), f, indent=2)
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(out, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config(cfg, special_ids), f, indent=2, ensure_ascii=False, default=str)
    for name in (CONFIG_FILE, MODELING_FILE):
        shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(out, name))
    if meta is not None:
        with open(os.path.join(out, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False, default=str)
    return os.path.abspath(out)


# ---- the tokenizer ------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """The printable character that byte-level BPE (GPT-2) writes for each byte 0..255:
    printable Latin-1 bytes stand for themselves, the others take code points from 256 up."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_hf():
    """reflex_jax's `bytes` tokenizer as a transformers tokenizer with the same ids: byte b is
    token b, <pad>=256, <s>=257, </s>=258, nothing added when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: b for b, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])  # ids 256, 257, 258, in this order
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def import_transformers_quietly() -> None:
    """Import transformers without its "PyTorch was not found" advice (an export needs only its
    tokenizers; the machine that loads the export needs torch, and transformers says so there)."""
    if "transformers" in sys.modules:
        return
    before = os.environ.get(NO_ADVICE)
    os.environ[NO_ADVICE] = "1"  # read when transformers/__init__ logs the advice
    try:
        import transformers  # noqa: F401
    finally:
        if before is None:
            del os.environ[NO_ADVICE]
        else:
            os.environ[NO_ADVICE] = before


def hf_tokenizer(name: str, cfg: ModelConfig):
    """Tokenizer `name` as a transformers tokenizer, its pad set (to eos if it has none)."""
    import_transformers_quietly()
    if name == "bytes":
        tok = byte_tokenizer_hf()
    else:
        from ..data import load_tokenizer
        tok = load_tokenizer(name).tok
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if len(tok) > cfg.vocab_size:
        raise ConvertError(f"tokenizer {name!r} has {len(tok)} tokens but the model has "
                           f"vocab_size={cfg.vocab_size}; export with the tokenizer the model "
                           "was trained with.")
    return tok
