"""HF GPT-2 -> reflex params (reflex_jax/interop/hf_gpt2.py, convert_weights.py).

Real `transformers.GPT2LMHeadModel`s (tiny, random) saved to disk are the reference: parity of the
vanilla conversion, the documented slices of reflex conversions, the SwiGLU mapping's error, the
refusal of code-running pickles and the user-facing errors.
"""
import json
import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from reflex_jax.checkpoint import load_params, read_checkpoint_meta
from reflex_jax.interop.hf_gpt2 import (SWIGLU_ALPHA, ConvertError, convert_gpt2, load_gpt2,
                                matching_config, parse_layers)
from reflex_jax.model import Decoder, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_gpt2(n_layer=2, n_head=4, n_embd=32, n_positions=16, vocab_size=50, n_inner=None,
              std=0.1, seed=0):
    """A random GPT-2 whose LayerNorms and biases are random too, so that copying them matters."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size, n_inner=n_inner, initializer_range=std,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, std)
            elif ".ln_" in name:
                p.normal_(1.0, 0.2)
    return model


def save_safetensors(model, directory, half=False):
    (model.half() if half else model).save_pretrained(directory)
    return str(directory)


def save_bin(model, directory, with_buffers=False):
    """The layout transformers 4 wrote with safe_serialization=False (v5 can no longer write it)."""
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    state = dict(model.state_dict())
    if with_buffers:  # old checkpoints (rugpt3large) carry the causal-mask buffers as well
        P = model.config.n_positions
        for i in range(model.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, P, P))
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return str(directory)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def jax_logits(cfg, params, tokens):
    return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, tokens))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """4 layers x 4 heads, n_embd 32: the source of the reflex and error tests."""
    model = make_gpt2(n_layer=4, n_head=4, n_embd=32, n_positions=16, vocab_size=50)
    return model, load_gpt2(save_safetensors(model, tmp_path_factory.mktemp("gpt2")))


# ---- parity -------------------------------------------------------------------------------------

SHAPES = {  # n_layer, n_head, n_embd, n_positions, vocab, n_inner, block_size (None: n_positions)
    "2x4-e32": (2, 4, 32, 16, 50, None, None),
    "3x2-e24-block12": (3, 2, 24, 20, 97, None, 12),
    "1x3-e48-inner100": (1, 3, 48, 9, 311, 100, None),
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "fp16-safetensors"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_vanilla_conversion_reproduces_gpt2_logits(tmp_path, shape, fmt):
    L, H, E, P, V, inner, block = SHAPES[shape]
    model = make_gpt2(L, H, E, P, V, inner, seed=L)
    if fmt == "bin":
        directory = save_bin(model, tmp_path / "m", with_buffers=True)
    else:
        directory = save_safetensors(model, tmp_path / "m", half=fmt.startswith("fp16"))
        model = model.float()  # the reference is the fp16-rounded weights in float32
    source = load_gpt2(directory)
    cfg = matching_config(source, block_size=block or P)
    assert (cfg.head_plan, cfg.norm, cfg.mlp, cfg.pos_emb, cfg.bias, cfg.tie_embeddings) == \
        ("none", "layernorm", "gelu", "learned", True, True)
    params, report = convert_gpt2(cfg, source)
    totals = report.totals()
    assert totals["new"] == 0 and totals["constant"] == 0
    assert totals["dropped"] == (P - cfg.block_size) * E  # only the unused position rows
    tokens = np.random.RandomState(1).randint(0, V, (2, cfg.block_size))
    want = torch_logits(model, tokens)
    got = jax_logits(cfg, params, tokens)
    assert np.abs(want).max() > 0.5  # logits that are not all ~0, so the bound means something
    assert np.abs(got - want).max() <= 1e-4


# ---- reflex targets: the documented slices --------------------------------------------------------

@pytest.mark.parametrize("reflex,layers", [("all", None), ("recent:1,1", [3, 1, 0, 2]),
                                           ("recent:2", None)])
def test_reflex_target_takes_documented_slices(gpt2, reflex, layers):
    model, source = gpt2
    cfg = matching_config(source, head_plan=reflex)
    params, report = convert_gpt2(cfg, source, layers=layers)
    E, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    picked = layers or list(range(cfg.n_layer))
    assert report.layers == picked
    for i, j in enumerate(picked):
        attn, p = params[f"h_{i}"]["attn"], f"h.{j}.attn."
        W, b = source.tensors[p + "c_attn.weight"], source.tensors[p + "c_attn.bias"]
        kv = cfg.layers[i].n_self * D
        for h in range(H):  # target head h = columns h*D..(h+1)*D
            np.testing.assert_array_equal(attn["q"]["kernel"][:, h], W[:, h * D:(h + 1) * D])
        np.testing.assert_array_equal(attn["q"]["bias"].reshape(-1), b[:E])
        np.testing.assert_array_equal(attn["k"]["kernel"].reshape(E, -1), W[:, E:E + kv])
        np.testing.assert_array_equal(attn["v"]["kernel"].reshape(E, -1), W[:, 2 * E:2 * E + kv])
        np.testing.assert_array_equal(attn["k"]["bias"].reshape(-1), b[E:E + kv])
        np.testing.assert_array_equal(attn["v"]["bias"].reshape(-1), b[2 * E:2 * E + kv])
        np.testing.assert_array_equal(attn["o"]["kernel"].reshape(E, E),
                                      source.tensors[p + "c_proj.weight"])
        np.testing.assert_array_equal(params[f"h_{i}"]["mlp"]["fc"]["kernel"],
                                      source.tensors[f"h.{j}.mlp.c_fc.weight"])
        np.testing.assert_array_equal(params[f"h_{i}"]["ln_2"]["bias"],
                                      source.tensors[f"h.{j}.ln_2.bias"])
    unused_kv = sum(2 * (E - p.n_self * D) * (E + 1) for p in cfg.layers)  # K and V, weight + bias
    unused_layers = sum(t.size for k, t in source.tensors.items()
                        if k.startswith("h.") and int(k.split(".")[1]) not in picked)
    assert report.totals()["dropped"] == unused_kv + unused_layers
    assert report.totals()["new"] == 0
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, cfg.block_size))
    logits = jax_logits(cfg, params, tokens)
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size) and np.isfinite(logits).all()
    if layers is None:  # same layers as GPT-2, but heads were reallocated: a different function
        assert np.abs(logits - torch_logits(model, tokens)).max() > 1e-3


def test_target_head_count_recuts_q_columns(gpt2):
    _, source = gpt2
    cfg = matching_config(source, n_head=2, head_plan="recent:1")  # head_dim 16 instead of 8
    params, report = convert_gpt2(cfg, source)
    W = source.tensors["h.1.attn.c_attn.weight"]
    np.testing.assert_array_equal(params["h_1"]["attn"]["q"]["kernel"][:, 1], W[:, 16:32])
    np.testing.assert_array_equal(params["h_1"]["attn"]["k"]["kernel"][:, 0], W[:, 32:48])
    assert any("n_head=2 differs" in n for n in report.notes)


def test_untied_rope_rmsnorm_target_reports_new_and_dropped(gpt2):
    _, source = gpt2
    cfg = matching_config(source, pos_emb="rope", norm="rmsnorm", tie_embeddings=False, bias=False,
                          param_dtype="bfloat16")
    params, report = convert_gpt2(cfg, source)
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(params)} == {"bfloat16"}
    np.testing.assert_array_equal(params["lm_head"],
                                  source.tensors["wte.weight"].T.astype(jax.numpy.bfloat16))
    np.testing.assert_array_equal(params["h_0"]["ln_1"]["scale"],
                                  source.tensors["h.0.ln_1.weight"].astype(jax.numpy.bfloat16))
    dropped = {r.source for r in report.rows if r.status == "dropped"}
    assert {"wpe.weight", "ln_f.bias", "h.0.ln_1.bias", "h.0.attn.c_attn.bias"} <= dropped
    n_bias = sum(t.size for k, t in source.tensors.items() if k.endswith(".bias"))
    assert report.totals()["dropped"] == n_bias + source.tensors["wpe.weight"].size
    assert "| dropped |" in report.table() and "wpe.weight" in report.table()


# ---- SwiGLU ---------------------------------------------------------------------------------------

def test_swiglu_mapping_keeps_the_mlp_function(tmp_path):
    # std 0.15 with n_embd 64 puts the MLP pre-activations at std ~1.2, as in trained GPT-2s,
    # where gelu is far from linear and the mapping's approximation actually shows.
    model = make_gpt2(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=100, std=0.15)
    source = load_gpt2(save_safetensors(model, tmp_path / "m"))
    cfg = matching_config(source, mlp="swiglu")
    params, report = convert_gpt2(cfg, source)
    mlp = params["h_1"]["mlp"]
    np.testing.assert_allclose(mlp["gate"]["kernel"],
                               SWIGLU_ALPHA * source.tensors["h.1.mlp.c_fc.weight"], rtol=1e-6)
    assert not np.any(mlp["up"]["kernel"]) and np.allclose(mlp["up"]["bias"], 1 / SWIGLU_ALPHA)
    np.testing.assert_array_equal(mlp["down"]["kernel"], source.tensors["h.1.mlp.c_proj.weight"])
    assert report.totals()["constant"] == 2 * (64 * 256 + 256)

    tokens = np.random.RandomState(0).randint(0, 100, (2, 32))
    want = torch_logits(model, tokens)
    delta = np.abs(jax_logits(cfg, params, tokens) - want).max()
    # without a mapping (fresh SwiGLU weights) the same model is off by several nats
    fresh = jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(1))
    unmapped = {**params, **{f"h_{i}": {**params[f"h_{i}"], "mlp": fresh[f"h_{i}"]["mlp"]}
                             for i in range(2)}}
    baseline = np.abs(jax_logits(cfg, unmapped, tokens) - want).max()
    assert want.std() > 1.0
    assert delta <= 0.1, delta           # measured 0.054
    assert baseline >= 30 * delta, (baseline, delta)  # measured 6.8


# ---- refusing code-running pickles ------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"): creates the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["torch-zip", "plain-pickle"])
def test_bin_whose_pickle_runs_code_is_refused(tmp_path, layout):
    directory = save_bin(make_gpt2(n_layer=1, n_embd=16, n_head=2), tmp_path / "m")
    marker = str(tmp_path / "PWNED")
    state = {"transformer.wte.weight": torch.zeros(3, 16), "evil": _Payload(marker)}
    path = os.path.join(directory, "pytorch_model.bin")
    if layout == "torch-zip":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    with pytest.raises(ConvertError, match=r"refused to load .*pytorch_model\.bin") as e:
        load_gpt2(directory)
    assert "trust" in str(e.value)
    assert not os.path.exists(marker)


# ---- user errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (dict(n_embd=48), r"wte\.weight has shape \(50, 32\) but the target needs \(50, 48\).*"
                      r"model\.n_embd=32"),
    (dict(vocab_size=60), r"wte\.weight has shape \(50, 32\) but the target needs \(60, 32\).*"
                          r"model\.vocab_size=50"),
    (dict(block_size=32), r"wpe\.weight has shape \(16, 32\) but model\.block_size=32 needs "
                          r"\(32, 32\).*block_size <= 16"),
    (dict(mlp_hidden=64), r"c_fc\.weight has shape \(32, 128\) but the target MLP needs \(32, 64\)"
                          r".*mlp_hidden=128"),
    (dict(n_layer=6), r"model\.n_layer=6 exceeds the source's 4 layers.*--layers"),
])
def test_mismatched_target_is_a_clear_error(gpt2, overrides, match):
    _, source = gpt2
    with pytest.raises(ConvertError, match=match):
        convert_gpt2(matching_config(source, **overrides), source)


def test_layers_flag_errors(gpt2):
    _, source = gpt2
    cfg = matching_config(source, n_layer=2)
    with pytest.raises(ConvertError, match=r"--layers lists 3 source layers but model\.n_layer=2"):
        convert_gpt2(cfg, source, layers=[0, 1, 2])
    with pytest.raises(ConvertError, match=r"source layer 7.*has 4 layers \(0\.\.3\)"):
        convert_gpt2(cfg, source, layers=[0, 7])
    with pytest.raises(ConvertError, match=r"--layers='0,x' must be comma-separated"):
        parse_layers("0,x")
    assert parse_layers("0, 2") == [0, 2] and parse_layers("") is None
    params, _ = convert_gpt2(cfg, source, layers=[3, 3])  # repeats are allowed
    np.testing.assert_array_equal(params["h_1"]["mlp"]["fc"]["kernel"],
                                  source.tensors["h.3.mlp.c_fc.weight"])


def test_missing_or_unreachable_checkpoints_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConvertError, match="neither an existing directory nor an HF hub id"):
        load_gpt2(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="has no config.json"):
        load_gpt2(str(tmp_path / "empty"))
    make_gpt2(n_layer=1, n_head=2, n_embd=16).config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(ConvertError, match="holds neither model.safetensors nor pytorch_model.bin"):
        load_gpt2(str(tmp_path / "noweights"))
    import huggingface_hub.constants as hub  # no network in tests: the hub answers "offline"
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConvertError, match=r"'nobody/tiny-gpt2' is not a local directory and could "
                                           r"not be fetched from the HF hub"):
        load_gpt2("nobody/tiny-gpt2")


# ---- damaged checkpoints: every tensor against the source's own config.json -----------------------

@pytest.fixture(scope="module")
def wide_gpt2(tmp_path_factory):
    """2 layers x 4 heads, n_embd 256, as safetensors: the tensors the damage tests start from."""
    from safetensors.numpy import load_file
    directory = save_safetensors(make_gpt2(n_layer=2, n_head=4, n_embd=256, n_positions=16,
                                           vocab_size=50), tmp_path_factory.mktemp("wide"))
    return directory, load_file(os.path.join(directory, "model.safetensors"))


def damaged_copy(wide_gpt2, directory, name, damage):
    """The checkpoint re-written with `damage` applied to tensor `name` (a real safetensors file)."""
    import shutil
    from safetensors.numpy import save_file
    source_dir, tensors = wide_gpt2
    tensors = dict(tensors)
    key = "transformer." + name
    tensors[key] = np.ascontiguousarray(damage(tensors[key]) if key in tensors else damage(None))
    os.makedirs(directory)
    shutil.copy(os.path.join(source_dir, "config.json"), directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


FIX = r"; the checkpoint in '.*' is damaged or does not match its config\.json; download it again " \
      r"or re-save it with save_pretrained\.$"


@pytest.mark.parametrize("name, damage, match", [
    # without the check: numpy's "cannot reshape array of size 48128 into shape (256,4,64)"
    ("h.1.attn.c_attn.weight", lambda a: a[:, :700],
     r"^source tensor h\.1\.attn\.c_attn\.weight has shape \(256, 700\) but config\.json "
     r"\(n_embd=256\) implies \(256, 768\)" + FIX),
    ("wte.weight", lambda a: a[:40],
     r"wte\.weight has shape \(40, 256\) but config\.json \(vocab_size=50, n_embd=256\) "
     r"implies \(50, 256\)" + FIX),
    ("wpe.weight", lambda a: a.T, r"wpe\.weight has shape \(256, 16\) but config\.json "
                                  r"\(n_positions=16, n_embd=256\) implies \(16, 256\)"),
    ("h.0.mlp.c_fc.bias", lambda a: a[:1000], r"h\.0\.mlp\.c_fc\.bias has shape \(1000,\) but "
     r"config\.json \(n_embd=256, n_inner=None \(4 \* n_embd\)\) implies \(1024,\)"),
    ("h.1.mlp.c_proj.weight", lambda a: a.T, r"h\.1\.mlp\.c_proj\.weight has shape \(256, 1024\) "
                                             r"but .* implies \(1024, 256\)"),
    ("h.0.ln_2.weight", lambda a: a[None], r"h\.0\.ln_2\.weight has shape \(1, 256\) .* \(256,\)"),
    ("h.2.ln_1.weight", lambda a: np.ones(256, np.float32),
     r"^source tensor h\.2\.ln_1\.weight belongs to layer 2 but config\.json has n_layer=2 "
     r"\(layers 0\.\.1\)" + FIX),
])
def test_damaged_tensor_is_named_before_any_reshape(wide_gpt2, tmp_path, name, damage, match):
    directory = damaged_copy(wide_gpt2, tmp_path / "m", name, damage)
    with pytest.raises(ConvertError, match=match):
        load_gpt2(directory)


def test_damaged_in_memory_source_and_the_cli(wide_gpt2, tmp_path, capsys):
    from reflex_jax.cli import convert
    from reflex_jax.interop.hf_gpt2 import Source
    source = load_gpt2(wide_gpt2[0])
    cfg = matching_config(source)
    # a Source built in memory (as bench.py does) is checked by convert_gpt2 itself
    bad = Source("in memory", "", None, source.config,
                 {**source.tensors, "h.1.attn.c_proj.weight": np.zeros((256, 250), np.float32)}, [])
    with pytest.raises(ConvertError, match=r"h\.1\.attn\.c_proj\.weight has shape \(256, 250\) "
                                           r"but config\.json \(n_embd=256\) implies \(256, 256\)"):
        convert_gpt2(cfg, bad)
    with pytest.raises(ConvertError, match=r"h\.1\.attn\.c_proj\.weight has shape \(256, 250\)"):
        matching_config(bad)
    directory = damaged_copy(wide_gpt2, tmp_path / "m", "h.1.attn.c_attn.weight", lambda a: a[:, :700])
    config = tmp_path / "wide.py"
    config.write_text(CONFIG_FILE.replace("50, 16, 4, 4, 32", "50, 16, 2, 4, 256"))
    assert convert.main(["--config", str(config), "--hf", directory, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        "convert_weights.py: error: source tensor h.1.attn.c_attn.weight has shape (256, 700) but "
        "config.json (n_embd=256) implies (256, 768)"), err
    assert not (tmp_path / "o").exists()


# ---- the CLI ------------------------------------------------------------------------------------------

CONFIG_FILE = """
from reflex_jax.run_config import base_config

def get_config():
    c = base_config()
    m = c.model
    m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd = 50, 16, 4, 4, 32
    m.norm, m.mlp, m.bias, m.pos_emb, m.head_plan = "layernorm", "gelu", True, "learned", "all"
    return c
"""


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_cli_writes_a_loadable_params_dir_with_provenance(tmp_path, gpt2):
    model, source = gpt2
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        os.path.join(source.directory, "tokenizer.json"))
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE)
    out = tmp_path / "out"
    run = _cli("--hf", source.directory, f"--config={config}", "--config.model.n_layer=2",
               "--config.model.head_plan=recent:1", "--layers", "2,0", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "| sliced |" in run.stdout and "h_0 <- h.2, h_1 <- h.0" in run.stdout
    cfg, params = load_params(str(out))
    assert (cfg.n_layer, cfg.head_plan) == (2, "recent:1")
    expected, _ = convert_gpt2(cfg, source, layers=[2, 0])
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    meta = read_checkpoint_meta(str(out))
    assert meta["tokenizer"] == source.directory and meta["layers"] == [2, 0]
    assert meta["source"] == source.directory and meta["source_files"] == ["model.safetensors"]
    json.dumps(meta)

    bad = _cli("--hf", source.directory, f"--config={config}", "--config.model.n_embd=64",
               "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "convert_weights.py: error: source tensor wte.weight has shape (50, 32)" in bad.stderr
    assert not (tmp_path / "bad").exists()


# ---- issue #32: damaged safetensors, config.json and index files; zip bombs ----------------------

def _small_dir(directory):
    return save_safetensors(make_gpt2(n_layer=1, n_head=2, n_embd=16, n_positions=8,
                                      vocab_size=20), directory)


def _header(path):
    import struct
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


def _with_header(raw, n, header):
    import struct
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _damage_safetensors(path, how):
    import struct
    raw, n, header = _header(path)
    if how == "header length 2^40":
        data = struct.pack("<Q", 2 ** 40) + raw[8:]
    elif how == "offsets past the end":
        name = next(k for k in header if k != "__metadata__")
        begin = header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [begin, begin + 10 ** 9]
        data = _with_header(raw, n, header)
    else:  # broken JSON
        data = raw[:8] + b"[" + raw[9:]
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["header length 2^40", "offsets past the end", "broken JSON"])
def test_damaged_safetensors_header_is_one_sentence(tmp_path, how, capsys):
    from reflex_jax.cli import convert
    directory = _small_dir(tmp_path / "m")
    weights = os.path.join(directory, "model.safetensors")
    _damage_safetensors(weights, how)
    config = tmp_path / "c.py"
    config.write_text(CONFIG_FILE)
    capsys.readouterr()  # transformers' progress bar while saving the source
    assert convert.main(["--config", str(config), "--hf", directory, "--out",
                         str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"convert_weights.py: error: {weights!r} cannot be read as safetensors ("), err
    assert err.endswith("); the file is damaged or not a safetensors file, so download or save it "
                        "again.")


def test_config_json_and_index_mistakes_are_one_sentence(tmp_path):
    directory = _small_dir(tmp_path / "m")
    cfg_path = os.path.join(directory, "config.json")
    good = open(cfg_path).read()

    def refused(path, text, match):
        with open(path, "w") as f:
            f.write(text)
        with pytest.raises(ConvertError, match=match):
            load_gpt2(directory)
    refused(cfg_path, "{not json", r"^'.*config\.json' is not valid JSON \(.*\); it should "
                                  r"be the checkpoint's config\.json")
    refused(cfg_path, "[1, 2]", "holds a JSON list, not an object")
    with open(cfg_path, "w") as f:
        f.write(good)
    # an index whose weight_map leaves the directory: refused before anything is opened
    os.rename(os.path.join(directory, "model.safetensors"), os.path.join(directory, "a.safetensors"))
    index = os.path.join(directory, "model.safetensors.index.json")
    for target in ("../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"):
        with open(index, "w") as f:
            json.dump({"weight_map": {"wte.weight": "a.safetensors", "wpe.weight": target}}, f)
        with pytest.raises(ConvertError, match=rf"maps tensors to {re.escape(repr(target))}, a "
                                               "path that leaves the checkpoint directory"):
            load_gpt2(directory)
    refused(index, '{"weight_map": ', "is not valid JSON")
    with open(index, "w") as f:
        json.dump({"weight_map": {"wte.weight": "a.safetensors"}}, f)
    assert load_gpt2(directory).files == ["a.safetensors"]  # a sharded checkpoint still loads


def _rezipped(src, dst, compress=True, claim=None):
    """A copy of a torch.save zip whose storage entries are deflated (a zip bomb when they are
    zeros), or, with `claim`, whose one storage entry's directory record claims `claim` bytes."""
    import zipfile
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            storage = "/data/" in info.filename and not info.filename.endswith(".pkl")
            kind = zipfile.ZIP_DEFLATED if storage and compress else zipfile.ZIP_STORED
            b.writestr(info.filename, a.read(info), compress_type=kind)
    if claim is not None:  # patch the central directory's sizes of the first storage entry
        import struct
        raw = bytearray(open(dst, "rb").read())
        with zipfile.ZipFile(dst) as z:
            name = next(i.filename for i in z.infolist() if "/data/" in i.filename
                        and not i.filename.endswith(".pkl")).encode()
        at = raw.rfind(b"PK\x01\x02", 0, raw.find(name, raw.find(b"PK\x01\x02")))
        struct.pack_into("<II", raw, at + 20, claim, claim)
        open(dst, "wb").write(bytes(raw))
    return str(dst)


def test_storage_that_inflates_is_refused_before_it_is_read(tmp_path):
    """A 260 KB torch.save file whose storage entry inflates to 256 MiB (the report's: 2.2 MB ->
    2 GiB, 2.5 GB RSS and 17 s before a refusal): refused from the zip's records alone, naming the
    file and the tensor, for --original (safe_pickle) and an HF pytorch_model.bin (torch.load)."""
    import resource
    from reflex_jax.interop.original import load_original
    plain = tmp_path / "plain.pt"
    args = dict(vocab_size=2 ** 22, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=True)
    torch.save({"model": {"transformer.wte.weight": torch.zeros(2 ** 26)}, "model_args": args}, plain)
    bomb = _rezipped(plain, tmp_path / "bomb.pt")
    assert os.path.getsize(bomb) < 2 ** 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConvertError, match=r"^'.*bomb\.pt': entry plain/data/0 \(tensor "
                                           r"transformer\.wte\.weight\) declares 268,435,456 bytes "
                                           r"but the file holds [\d,]+ of it compressed, and "
                                           r"torch\.save stores tensors uncompressed"):
        load_original(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB
    liar = _rezipped(plain, tmp_path / "liar.pt", compress=False, claim=2 ** 31)
    with pytest.raises(ConvertError, match=r"declares 2,147,483,648 bytes but the file holds"):
        load_original(liar)
    directory = save_bin(make_gpt2(n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=20),
                         tmp_path / "hf")
    weights = os.path.join(directory, "pytorch_model.bin")
    os.replace(_rezipped(weights, tmp_path / "deflated.bin"), weights)
    with pytest.raises(ConvertError, match=r"pytorch_model\.bin': entry .*/data/\d+ declares "
                                           r"[\d,]+ bytes but the file holds [\d,]+ of it compressed"):
        load_gpt2(directory)


def test_overlapping_strides_cannot_allocate_past_the_storage(tmp_path):
    from reflex_jax.interop.safe_pickle import TorchArchive
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(4096, 4096)}, path)  # stride (0, 0): one float stored
    with TorchArchive(str(path)) as archive:
        with pytest.raises(ConvertError, match=r"tensor w has shape \(4096, 4096\) \(16,777,216 "
                                               r"elements\) but its storage data/0 holds only 1"):
            archive.load()["w"].array("w")
