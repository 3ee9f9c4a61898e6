"""The original PyTorch Reflex code's checkpoints in and out (reflex_jax/interop/original.py) and
the torch-free, code-free reader of torch.save files (reflex_jax/interop/safe_pickle.py).

The reference is a PyTorch statement of the original model written here from its description
(nanoGPT names, RMSNorm eps 1e-6 with an unused bias, the `all` schedule, c_fc -> SwiGLU(act.proj)
-> c_proj), with random non-trivial weights, saved in both of the original's file formats.
"""
import builtins
import copy
import dataclasses
import functools
import json
import os
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from reflex_jax.checkpoint import load_params, read_checkpoint_meta
from reflex_jax.errors import ConvertError
from reflex_jax.interop.original import (convert_original_to_dir, load_original,
                                         original_to_params, write_original)
from reflex_jax.interop.safe_pickle import load_torch_file
from reflex_jax.model import Decoder, ModelConfig, abstract_params


@dataclasses.dataclass
class GPTConfig:
    """The notebook's config dataclass; pickled as `__main__.GPTConfig`, which the reader cannot
    import (it never imports anything)."""
    batch_size: int = 8
    block_size: int = 16
    vocab_size: int = 50
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True
    local_files_only: bool = True


GPTConfig.__module__ = "__main__"
HUB_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


# ---- the original model, stated in PyTorch -------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None  # present, never used

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ReflexSelfAttention(nn.Module):
    """Layer i: heads 0..H-i-1 attend over their own K/V; head H-i+k reads the K/V exported by
    layer i-1-k (newest first). The layer exports the K/V of its last self head."""

    def __init__(self, c, layer):
        super().__init__()
        self.c, self.layer = c, layer
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x, exports):
        B, T, E = x.shape
        H = self.c.n_head
        q, k, v = (t.view(B, T, H, E // H).transpose(1, 2) for t in self.c_attn(x).split(E, dim=2))
        n_self = H - self.layer
        k_all = torch.cat([k[:, :n_self]] + [ek for ek, _ in reversed(exports)], dim=1)
        v_all = torch.cat([v[:, :n_self]] + [ev for _, ev in reversed(exports)], dim=1)
        y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        exports.append((k[:, n_self - 1:n_self], v[:, n_self - 1:n_self]))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, E))


class SwiGLU(nn.Module):
    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.proj = nn.Linear(d_in, 2 * d_out, bias=bias)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.silu(gate)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c.n_embd
        self.c_fc = nn.Linear(d, 4 * d, bias=c.bias)
        self.act = SwiGLU(4 * d, 4 * d, c.bias)
        self.c_proj = nn.Linear(4 * d, d, bias=c.bias)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))  # no activation after c_fc


class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.ln_1, self.ln_2 = RMSNorm(c.n_embd, c.bias), RMSNorm(c.n_embd, c.bias)
        self.attn, self.mlp = ReflexSelfAttention(c, layer), MLP(c)

    def forward(self, x, exports):
        x = x + self.attn(self.ln_1(x), exports)
        return x + self.mlp(self.ln_2(x))


class OriginalGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList([Block(c, i) for i in range(c.n_layer)]),
            ln_f=RMSNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        exports = []
        for block in t.h:
            x = block(x, exports)
        return self.lm_head(t.ln_f(x))


def make_original(c=None, seed=0, std=0.15):
    """Random weights, random norm weights and biases (the unused norm biases too)."""
    torch.manual_seed(seed)
    model = OriginalGPT(c or GPTConfig()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, std)
    return model


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).numpy()


def save_hub_dir(model, c, directory):
    """As PyTorchModelHubMixin saves it: the tied tensor once (as lm_head.weight), and a
    config.json of the dataclass fields only."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k != "transformer.wte.weight"}
    save_file(state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({k: getattr(c, k) for k in HUB_FIELDS}, f)
    return str(directory)


def save_ckpt(model, c, path, **extra):
    """As the notebook saves it: a torch.compile'd model's state dict, a real AdamW state,
    and the GPTConfig instance."""
    trained = copy.deepcopy(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    trained(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()  # a real optimizer state; the weights saved are the reference's
    ckpt = {"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "model_args": {k: getattr(c, k) for k in HUB_FIELDS},
            "iter_num": 250, "best_val_loss": torch.tensor(2.5), "config": c, **extra}
    main = sys.modules["__main__"]
    main.GPTConfig = GPTConfig  # pickle looks the class up where its __module__ says
    try:
        torch.save(ckpt, path)
    finally:
        del main.GPTConfig
    return str(path)


_APPLY = {}


def jax_logits(cfg, params, tokens):
    if cfg not in _APPLY:
        _APPLY[cfg] = jax.jit(Decoder(cfg).apply)
    return np.asarray(_APPLY[cfg]({"params": params}, tokens))


@pytest.fixture(scope="module")
def original():
    model = make_original()
    tokens = np.random.RandomState(1).randint(0, 50, (2, 16))
    return model, tokens, reference_logits(model, tokens)


# ---- import: both formats reproduce the original's logits ----------------------------------------

@pytest.mark.parametrize("fmt", ["hub-mixin", "ckpt"])
def test_original_checkpoint_converts_to_the_same_logits(original, tmp_path, fmt):
    model, tokens, want = original
    c = GPTConfig()
    src = (save_hub_dir(model, c, tmp_path / "hub") if fmt == "hub-mixin"
           else save_ckpt(model, c, tmp_path / "ckpt_250.pt"))
    report = convert_original_to_dir(src, str(tmp_path / "out"))
    cfg, params = load_params(str(tmp_path / "out"))
    assert (cfg.head_plan, cfg.norm, cfg.norm_eps, cfg.mlp, cfg.hidden, cfg.bias, cfg.tie_embeddings,
            cfg.pos_emb) == ("all", "rmsnorm", 1e-6, "swiglu", 128, True, True, "learned")
    got = jax_logits(cfg, params, tokens)
    assert np.abs(want).max() > 1.0  # logits far from zero, so the bound means something
    assert np.abs(got - want).max() <= 1e-4
    totals = report.totals()
    E, D, L = 32, 8, 4
    cross_heads = sum(range(L))  # layer i has i cross heads
    assert totals["new"] == 0 and totals["constant"] == 0
    # dropped: the 9 unused RMSNorm biases and the cross heads' K and V rows (weights + biases)
    assert totals["dropped"] == (2 * L + 1) * E + cross_heads * 2 * D * (E + 1)
    meta = read_checkpoint_meta(str(tmp_path / "out"))
    assert meta["source_config"]["n_layer"] == 4 and meta["source_format"] == f"original {fmt}"
    if fmt == "ckpt":
        assert meta["iter_num"] == 250 and meta["best_val_loss"] == 2.5
    assert any("folded" in r.source for r in report.rows if r.target.endswith("mlp.up.kernel"))
    assert any(n.startswith("mlp: act.proj o c_fc folded exactly") for n in report.notes)


def test_bias_free_original_with_a_biased_act_proj(original, tmp_path):
    """bias=False, but act.proj an nn.Linear with its default bias: the target keeps biases and
    zero-fills the others, still exactly the original."""
    _, tokens, _ = original
    c = GPTConfig(bias=False)
    model = make_original(c, seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.act.proj = nn.Linear(4 * c.n_embd, 8 * c.n_embd)
            block.mlp.act.proj.weight.normal_(0.0, 0.15)
            block.mlp.act.proj.bias.normal_(0.0, 0.15)
    cfg, params, report = original_to_params(save_hub_dir(model, c, tmp_path / "hub"))
    # zeros: the q, o and down biases (32 each) and the self heads' k and v biases
    assert cfg.bias and report.totals()["constant"] == sum(3 * 32 + 2 * (4 - i) * 8 for i in range(4))
    assert np.abs(params["h_1"]["mlp"]["up"]["bias"]).max() > 0.1  # act.proj's bias, folded
    want = reference_logits(model, tokens)
    assert np.abs(jax_logits(cfg, params, tokens) - want).max() <= 1e-4
    assert any("bias=False but act.proj carries a bias" in n for n in report.notes)


def test_schedule_is_the_originals():
    """Layer i: H-i self heads, then one head per earlier layer i-1, ..., 0, each reading that
    layer's last self head (the one the original exports)."""
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=50, block_size=16, head_plan="all")
    for i, plan in enumerate(cfg.layers):
        assert plan.n_self == 4 - i
        assert [(g.source, g.n_heads, g.source_heads) for g in plan.cross] == \
            [(j, 1, (4 - j - 1,)) for j in range(i - 1, -1, -1)]


def test_unused_parameters_do_not_change_the_originals_logits(original):
    """What the conversion drops is dead in the original: perturbing it changes nothing."""
    model, tokens, want = original
    perturbed = make_original()
    E, D, H = 32, 8, 4
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if ".ln_" in name and name.endswith("bias"):
                p.add_(torch.randn_like(p) * 3.0)
        for i, block in enumerate(perturbed.transformer.h):
            n_self = H - i
            for lo in (E, 2 * E):  # K and V rows of the cross heads
                block.attn.c_attn.weight[lo + n_self * D:lo + E].normal_(0.0, 5.0)
                block.attn.c_attn.bias[lo + n_self * D:lo + E].normal_(0.0, 5.0)
    assert np.abs(reference_logits(perturbed, tokens) - want).max() == 0.0
    with torch.no_grad():  # a used row does change them: the perturbation above was real
        perturbed.transformer.h[1].attn.c_attn.weight[E].add_(1.0)
    assert np.abs(reference_logits(perturbed, tokens) - want).max() > 1e-3


def test_block_size_override_and_fixed_fields(original, tmp_path):
    model, tokens, want = original
    src = save_hub_dir(model, GPTConfig(), tmp_path / "hub")
    cfg, params, report = original_to_params(src, {"block_size": 8, "dtype": "bfloat16"})
    assert cfg.block_size == 8 and params["wpe"].shape == (8, 32)
    assert report.totals()["dropped"] > 8 * 32
    with pytest.raises(ConvertError, match=r"model\.n_head=2 cannot be overridden here: the "
                                           r"original checkpoint fixes it to 4"):
        original_to_params(src, {"n_head": 2})
    with pytest.raises(ConvertError, match=r"block_size=32 exceeds the original's 16"):
        original_to_params(src, {"block_size": 32})


# ---- export: this project's params -> the original's format --------------------------------------

def random_reflex_params(cfg, seed=0):
    """Random params of `cfg`'s shapes: weights, norm scales around 1 and biases all random."""
    rng = np.random.RandomState(seed)
    shapes = abstract_params(cfg)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1.0 + 0.2 * rng.randn(*leaf.shape)).astype(np.float32)
        return (0.15 * rng.randn(*leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


EXPORTABLE = dict(n_layer=4, n_head=4, n_embd=32, vocab_size=50, block_size=16, mlp_hidden=128,
                  norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=True, pos_emb="learned",
                  tie_embeddings=True, head_plan="all")


def test_export_round_trip_through_the_original(original, tmp_path):
    _, tokens, _ = original
    cfg = ModelConfig(**EXPORTABLE)
    params = random_reflex_params(cfg)
    want = jax_logits(cfg, params, tokens)
    write_original(cfg, params, str(tmp_path / "orig"))
    c = GPTConfig(**{k: v for k, v in json.load(open(tmp_path / "orig" / "config.json")).items()})
    model = OriginalGPT(c).eval()
    model.load_state_dict(load_file(str(tmp_path / "orig" / "model.safetensors")), strict=True)
    got = reference_logits(model, tokens)
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() <= 1e-4
    # and back: the import of the export is the same params (c_fc = [I; 0] folds away exactly)
    cfg2, back, _ = original_to_params(str(tmp_path / "orig"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change,match", [
    ({"mlp": "gelu"}, r"model\.mlp='gelu': the original's MLP is c_fc -> SwiGLU"),
    ({"head_plan": "none"}, r"model\.head_plan='none' gives the plan none 4x4: 4 \| 4 \| 4 \| 4, "
                            r"but the original code always runs all 4x4"),
    ({"reflex_window": 1}, r"model\.reflex_window=1 gives the plan"),
    ({"norm_eps": 1e-5}, r"model\.norm_eps=1e-05: the original's RMSNorm adds eps 1e-06"),
    ({"tie_embeddings": False}, r"model\.tie_embeddings=False: the original ties lm_head to wte"),
    ({"n_layer": 5, "head_plan": "recent:1"}, r"model\.n_layer=5 > n_head=4"),
])
def test_export_refuses_what_the_original_cannot_compute(tmp_path, change, match):
    cfg = ModelConfig(**{**EXPORTABLE, **change})
    with pytest.raises(ConvertError, match=match):
        write_original(cfg, None, str(tmp_path / "orig"))
    assert not (tmp_path / "orig").exists()


# ---- reading .pt files safely --------------------------------------------------------------------

def test_torch_save_reader_rebuilds_tensors_exactly(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    saved = {"view": base[1:, 2:5], "transposed": base.t(), "half": torch.randn(3, 2).half(),
             "bf16": torch.randn(2, 5).bfloat16().t(), "long": torch.arange(5),
             "int": torch.arange(3, dtype=torch.int32), "bool": torch.tensor([True, False]),
             "scalar": torch.tensor(3.5), "config": GPTConfig(n_layer=7), "set": {1, 2}}
    main = sys.modules["__main__"]
    main.GPTConfig = GPTConfig
    try:
        torch.save(saved, tmp_path / "x.pt")
    finally:
        del main.GPTConfig
    got = load_torch_file(str(tmp_path / "x.pt"))
    for k in ("view", "transposed", "half", "bf16", "long", "int", "bool", "scalar"):
        want = saved[k].float().numpy() if k in ("half", "bf16") else saved[k].numpy()
        assert got[k].shape == want.shape and got[k].dtype == want.dtype, k
        np.testing.assert_array_equal(got[k], want)
    assert got["config"].fields["n_layer"] == 7 and got["config"].origin == "__main__.GPTConfig"
    assert got["set"] == {1, 2}
    with pytest.raises(Exception, match="GPTConfig"):  # the fact that makes this reader necessary
        torch.load(tmp_path / "x.pt", weights_only=True)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec(_System):
    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Partial(_System):
    def __reduce__(self):
        return (functools.partial, (os.system, f"touch {self.marker}"))


@pytest.mark.parametrize("payload,named", [(_System, "posix.system"), (_Exec, "builtins.exec"),
                                           (_Partial, "functools.partial")])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, payload, named):
    marker = tmp_path / "MARKER"
    path = tmp_path / "ckpt_1.pt"
    torch.save({"model": {"_orig_mod.transformer.wte.weight": torch.zeros(2, 2)},
                "config": payload(marker)}, path)
    for read in (load_torch_file, load_original):
        with pytest.raises(ConvertError, match=f"refused to read .*its pickle calls {named}, "
                                               "which builds no tensor or container"):
            read(str(path))
    assert not marker.exists()


# ---- the user's mistakes: one sentence each ------------------------------------------------------

def test_more_layers_than_heads_is_refused(tmp_path):
    c = GPTConfig(n_layer=9, n_head=8, n_embd=16)
    src = save_hub_dir(make_original(c), c, tmp_path / "hub")
    with pytest.raises(ConvertError, match=r"the original model has n_layer=9 > n_head=8: its layer "
                                           r"8 keeps no self head"):
        convert_original_to_dir(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def hub_dir(original, tmp_path_factory):
    return save_hub_dir(original[0], GPTConfig(), tmp_path_factory.mktemp("hub") / "m")


def _edited_copy(hub_dir, directory, edit_state=None, edit_config=None):
    os.makedirs(directory)
    state = load_file(os.path.join(hub_dir, "model.safetensors"))
    config = json.load(open(os.path.join(hub_dir, "config.json")))
    save_file(edit_state(state) if edit_state else state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(edit_config(config) if edit_config else config, f)
    return str(directory)


def _without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.parametrize("state,config,match", [
    (lambda s: {**s, "transformer.h.1.attn.c_attn.weight": torch.zeros(96, 31)}, None,
     r"original tensor transformer\.h\.1\.attn\.c_attn\.weight has shape \(96, 31\) but the config "
     r"\(vocab_size=50, block_size=16, n_embd=32\) implies \(96, 32\)"),
    (lambda s: _without(s, "transformer.h.2.mlp.act.proj.weight"), None,
     r"has no tensor 'transformer\.h\.2\.mlp\.act\.proj\.weight'"),
    (lambda s: _without(s, "transformer.h.0.attn.c_proj.bias"), None,
     r"has no tensor 'transformer\.h\.0\.attn\.c_proj\.bias'"),
    (None, lambda c: _without(c, "n_head", "bias"),
     r"lacks the original config fields n_head, bias"),
    (lambda s: {**s, "transformer.h.4.ln_1.weight": torch.ones(32)}, None,
     r"transformer\.h\.4\.ln_1\.weight belongs to layer 4 but the config has n_layer=4"),
])
def test_damaged_or_incomplete_sources_fail_in_one_sentence(hub_dir, tmp_path, state, config, match):
    src = _edited_copy(hub_dir, tmp_path / "m", state, config)
    with pytest.raises(ConvertError, match=match) as e:
        load_original(src) if config else original_to_params(src)
    assert len(str(e.value).splitlines()) == 1


def test_missing_sources_fail_in_one_sentence(hub_dir, tmp_path):
    with pytest.raises(ConvertError, match=r"is neither an existing file or directory nor an HF hub"):
        load_original(str(tmp_path / "nothing" / "here.pt"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConvertError, match=r"has no model\.safetensors \(the weights\)"):
        load_original(str(tmp_path / "empty"))
    with pytest.raises(ConvertError, match=r"could not be fetched from the HF hub .*pass the local "
                                           r"directory instead"):
        load_original("nobody-here/no-such-reflex-model")  # tests run offline
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "ckpt_3.pt")
    with pytest.raises(ConvertError, match=r"has no \"model\" state dict \(it holds "
                                           r"\['state_dict'\]\)"):
        load_original(str(tmp_path / "ckpt_3.pt"))
    (tmp_path / "not_a_zip.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ConvertError, match=r"is not a torch\.save zip archive"):
        load_original(str(tmp_path / "not_a_zip.pt"))
    bad_json = _edited_copy(hub_dir, tmp_path / "bad_json")
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write("{'n_layer': 4")
    with pytest.raises(ConvertError, match=r"config\.json' is not valid JSON"):
        load_original(bad_json)
    torch.save({"model": {}, "config": {"n_layer": 2}}, tmp_path / "ckpt_4.pt")
    with pytest.raises(ConvertError, match=r"lacks the original config fields vocab_size, "
                                           r"block_size, n_head, n_embd, bias"):
        load_original(str(tmp_path / "ckpt_4.pt"))
