"""HF Llama-family checkpoints -> reflex params (reflex_jax/interop/hf_llama.py, hf_import.py,
convert_weights.py --hf).

Real `LlamaForCausalLM`, `Qwen2ForCausalLM` and `MistralForCausalLM`s (tiny, random, saved with
save_pretrained) are the reference: exact logits and greedy generation onto the equivalent plan,
the report of an import onto `all`, the one-sentence refusals and the config built without
--config.
"""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from marks import fast_only
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from reflex_jax.checkpoint import load_params, read_checkpoint_meta
from reflex_jax.errors import ConvertError
from reflex_jax.interop.hf_import import convert_hf, equivalent_config, load_hf
from reflex_jax.model import Decoder, ModelConfig

E, H, F, V, P = 64, 4, 96, 120, 64   # hidden, heads, intermediate, vocab, max positions
KINDS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "mistral": (MistralConfig, MistralForCausalLM)}


def make_model(kind="llama", n_kv=H, tied=False, n_layer=2, seed=0, **extra):
    """A random model whose norm weights and biases are random too, so copying them matters;
    rope_theta and eps are not the defaults, so reading them matters."""
    torch.manual_seed(seed)
    config_cls, model_cls = KINDS[kind]
    if kind == "mistral":
        extra.setdefault("sliding_window", None)
    cfg = config_cls(hidden_size=E, intermediate_size=F, num_hidden_layers=n_layer,
                     num_attention_heads=H, num_key_value_heads=n_kv, vocab_size=V,
                     max_position_embeddings=P, rope_theta=500.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=tied, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                     attn_implementation="eager", **extra)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.1)
    return model


def save(model, directory):
    model.save_pretrained(directory)
    return str(directory)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def jax_logits(cfg, params, tokens):
    return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, tokens))


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and not re.search(r"\.\s+[A-Z]", message)


# ---- exact parity onto the equivalent plan ------------------------------------------------------

PARITY = {  # kind, K/V heads, tied, extra config, target head plan (None: the equivalent one)
    "llama-mha-tied": ("llama", 4, True, {}, None),
    "llama-gqa-untied": ("llama", 2, False, {}, None),
    "llama-biases": ("llama", 2, False, dict(attention_bias=True, mlp_bias=True), None),
    "llama-attention-bias": ("llama", 4, True, dict(attention_bias=True), None),
    "qwen2-gqa-tied": ("qwen2", 2, True, {}, None),
    "qwen2-mha-untied": ("qwen2", 4, False, {}, None),
    "mistral-gqa-untied": ("mistral", 2, False, {}, None),
    "mistral-mqa-tied": ("mistral", 1, True, {}, None),
    "llama-gqa-onto-none": ("llama", 2, False, {}, "none"),
    "llama-gqa-onto-kv": ("llama", 2, True, {}, "kv:4,2"),
}


@pytest.mark.parametrize("case", fast_only(list(PARITY), "llama-gqa-untied", "llama-biases",
                                            "qwen2-gqa-tied", "mistral-mqa-tied",
                                            "llama-gqa-onto-none"))
def test_import_reproduces_hf_logits(tmp_path, case):
    kind, n_kv, tied, extra, plan = PARITY[case]
    model = make_model(kind, n_kv, tied, seed=len(case), **extra)
    source = load_hf(save(model, tmp_path / "m"))
    cfg = equivalent_config(source, **({"head_plan": plan} if plan else {}))
    biased = kind == "qwen2" or bool(extra)
    assert (cfg.norm, cfg.mlp, cfg.pos_emb, cfg.rope_theta, cfg.norm_eps, cfg.bias,
            cfg.tie_embeddings) == ("rmsnorm", "swiglu", "rope", 500.0, 1e-5, biased, tied)
    assert cfg.head_plan == plan or cfg.head_plan == ("none" if n_kv == H else f"gqa:{H // n_kv}")
    params, report = convert_hf(cfg, source)
    totals = report.totals()
    assert totals["new"] == 0 and totals["dropped"] == 0
    if not biased:
        assert totals["constant"] == 0
    tokens = np.random.RandomState(1).randint(0, V, (3, 24))
    want = hf_logits(model, tokens)
    got = jax_logits(cfg, params, tokens)
    assert np.abs(want).max() > 0.5  # logits that are not all ~0, so the bound means something
    assert np.abs(got - want).max() <= 1e-4


def test_biases_the_model_lacks_are_zero_constants(tmp_path):
    """Qwen2 biases q/k/v only: under model.bias=True o_proj's and the MLP's biases are zeros, and
    model.bias=False drops the q/k/v biases and says so."""
    source = load_hf(save(make_model("qwen2", 2, n_layer=1), tmp_path / "m"))
    params, report = convert_hf(equivalent_config(source), source)
    zeros = {r.target for r in report.rows if r.status == "constant"}
    assert zeros == {"h_0.attn.o.bias", "h_0.mlp.gate.bias", "h_0.mlp.up.bias", "h_0.mlp.down.bias"}
    assert all(not np.any(np.asarray(params["h_0"]["mlp"][n]["bias"])) for n in ("gate", "up", "down"))
    np.testing.assert_array_equal(params["h_0"]["attn"]["k"]["bias"],
                                  source.tensors["layers.0.self_attn.k_proj.bias"].reshape(2, 16))
    assert any("no o_proj, gate_proj, up_proj, down_proj biases" in n for n in report.notes)
    _, report = convert_hf(equivalent_config(source, bias=False), source)
    dropped = {r.source for r in report.rows if r.status == "dropped"}
    assert dropped == {f"layers.0.self_attn.{p}_proj.bias" for p in "qkv"}
    assert any("q_proj, k_proj, v_proj biases are dropped" in n for n in report.notes)


@pytest.mark.slow
def test_greedy_generation_equals_hf_generate(tmp_path):
    from reflex_jax.sampling import generate
    model = make_model("llama", 2, False, n_layer=3, seed=3)
    model.generation_config.eos_token_id = None
    source = load_hf(save(model, tmp_path / "m"))
    cfg = equivalent_config(source)
    params, _ = convert_hf(cfg, source)
    prompts = np.random.RandomState(2).randint(3, V, (3, 7))
    with torch.no_grad():
        want = model.generate(torch.as_tensor(prompts), attention_mask=torch.ones(3, 7, dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 7:].tolist()
    assert generate(cfg, params, prompts.tolist(), max_new_tokens=12) == want


# ---- onto a Reflex plan: every tensor's fate ------------------------------------------------------

@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """3 layers x 4 heads on 2 K/V heads (groups of 2), untied."""
    model = make_model("llama", 2, False, n_layer=3, seed=5)
    return model, load_hf(save(model, tmp_path_factory.mktemp("gqa")))


def test_import_onto_all_reports_each_tensor(gqa_llama):
    model, source = gqa_llama
    cfg = equivalent_config(source, head_plan="all")  # 4 | 3+1 | 2+2
    params, report = convert_hf(cfg, source)
    rows = {r.target: r for r in report.rows if r.target}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = {".".join(k.key for k in path) for path, _ in flat}
    assert set(rows) == names  # every target tensor has exactly one row
    assert all(r.status == "copied" for t, r in rows.items() if not re.search(r"attn\.[kv]\.", t))
    # self head h reads the source's K/V head h // 2, so layer l's n_self K/V heads are [0,0,1,..]
    for layer, heads in ((0, "0,0,1,1"), (1, "0,0,1"), (2, "0,0")):
        for proj in "kv":
            row = rows[f"h_{layer}.attn.{proj}.kernel"]
            assert row.status == "sliced" and row.source == \
                f"layers.{layer}.self_attn.{proj}_proj.weight[K/V heads {heads}].T"
    k2 = source.tensors["layers.2.self_attn.k_proj.weight"].reshape(2, 16, E)
    np.testing.assert_array_equal(params["h_2"]["attn"]["k"]["kernel"],
                                  np.stack([k2[0], k2[0]]).transpose(2, 0, 1))
    dropped = [r for r in report.rows if r.status == "dropped"]
    # only layer 2 leaves a K/V head unused: its self heads 0, 1 both read source head 0
    assert sorted(r.source for r in dropped) == [
        "layers.2.self_attn.k_proj.weight (unused part)", "layers.2.self_attn.v_proj.weight (unused part)"]
    assert all(r.n_params == 16 * E for r in dropped)
    totals = report.totals()
    assert totals["new"] == 0 and totals["constant"] == 0
    table = report.table()
    assert "h_0 <- layers.0, h_1 <- layers.1, h_2 <- layers.2" in table
    assert "| copied | 12,288 (3x) | h_{i}.attn.q.kernel | layers.{j}.self_attn.q_proj.weight.T |" in table
    assert "note: layers 1, 2 have cross heads" in table
    # layer 0 keeps every head: its output is the source's (its K/V heads repeat the groups)
    from reflex_jax.model.layers import Block
    tokens = np.random.RandomState(0).randint(0, V, (2, 16))
    with torch.no_grad():
        want = model.model(torch.as_tensor(tokens), output_hidden_states=True).hidden_states[1]
    positions = np.broadcast_to(np.arange(16), (2, 16))
    block = jax.jit(lambda p, x: Block(cfg, 0).apply({"params": p}, x, (), positions, None, None,
                                                     None, True)[0])
    got = block(params["h_0"], params["wte"][tokens])
    assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-4


def test_regrouped_heads_and_layer_mapping_are_reported(gqa_llama):
    _, source = gqa_llama
    _, report = convert_hf(equivalent_config(source, head_plan="gqa:4"), source)
    assert any("across the source's groups of 2" in n for n in report.notes)
    cfg = equivalent_config(source, n_layer=2)
    params, report = convert_hf(cfg, source, layers=[2, 0])
    assert "h_0 <- layers.2, h_1 <- layers.0" in report.table()
    np.testing.assert_array_equal(params["h_0"]["mlp"]["down"]["kernel"],
                                  source.tensors["layers.2.mlp.down_proj.weight"].T)
    with pytest.raises(ConvertError, match=r"model\.n_layer=4 exceeds the source's 3 layers"):
        convert_hf(equivalent_config(source, n_layer=4), source)


# ---- refusals: one sentence naming the field -------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per kind (2 layers, 4 heads on 2 K/V heads)."""
    root = tmp_path_factory.mktemp("kinds")
    return {kind: save(make_model(kind, 2), root / kind) for kind in KINDS}


def edited(saved, tmp_path, kind, edit):
    """A copy of the `kind` checkpoint whose config.json has `edit` applied."""
    directory = tmp_path / f"{kind}-edited"
    shutil.copytree(saved[kind], directory)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return str(directory)


def _set(**fields):
    def edit(config):
        for key, value in fields.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
    return edit


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("kind, edit, match", [
    ("llama", _set(rope_parameters=LLAMA3), r"^config\.json rope_parameters\.rope_type='llama3'"),
    ("llama", _set(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     r"rope_parameters\.rope_type='linear'"),
    ("qwen2", _set(rope_parameters=None, rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0}),
     r"^config\.json rope_scaling\.rope_type='yarn'"),
    ("llama", _set(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                    "partial_rotary_factor": 0.5}), r"partial_rotary_factor=0\.5"),
    ("llama", _set(head_dim=32), r"^config\.json head_dim=32 differs from hidden_size/"
                                 r"num_attention_heads=16"),
    ("mistral", _set(hidden_act="gelu"), r"^config\.json hidden_act='gelu'"),
    ("llama", _set(model_type="phi3"), r"is a 'phi3' model \(config\.json model_type\); "
                                       r"convert_weights\.py reads model_type gpt2, llama, mistral, qwen2"),
    ("qwen2", _set(layer_types=["full_attention", "linear_attention"]), r"layer_types holds "
                                                                       r"'linear_attention'"),
    ("llama", _set(quantization_config={"quant_method": "bitsandbytes"}),
     r"^config\.json quantization_config"),
    ("llama", _set(hidden_size=None), r"lacks hidden_size"),
])
def test_what_the_model_cannot_compute_is_one_sentence(saved, tmp_path, kind, edit, match):
    with pytest.raises(ConvertError, match=match) as error:
        load_hf(edited(saved, tmp_path, kind, edit))
    assert one_sentence(str(error.value)), str(error.value)


@pytest.mark.parametrize("kind, edit", [
    ("mistral", _set(sliding_window=16)),
    ("qwen2", _set(use_sliding_window=True, sliding_window=16, max_window_layers=1,
                   layer_types=None)),
])
def test_sliding_window_beyond_block_size_is_one_sentence(saved, tmp_path, kind, edit):
    source = load_hf(edited(saved, tmp_path, kind, edit))
    assert source.window == 16
    assert equivalent_config(source).block_size == 16  # exact: within 16 tokens it never applies
    with pytest.raises(ConvertError, match=r"^config\.json sliding_window=16: .*"
                                           r"model\.block_size=64 .*set model\.block_size=16 or less\.$"
                       ) as error:
        convert_hf(equivalent_config(source, block_size=64), source)
    assert one_sentence(str(error.value))


def test_windows_that_never_apply_are_accepted(saved, tmp_path):
    assert load_hf(saved["mistral"]).window is None                    # sliding_window null
    qwen = load_hf(edited(saved, tmp_path, "qwen2", _set(sliding_window=16)))
    assert qwen.window is None                                         # use_sliding_window false
    wide = load_hf(edited(saved, tmp_path, "mistral", _set(sliding_window=4096)))
    assert equivalent_config(wide).block_size == P                     # window beyond positions


@pytest.mark.parametrize("overrides, match", [
    (dict(n_head=8), r"^model\.n_head=8 differs from the source's 4 heads of size 16.*"
                     r"set model\.n_head=4\.$"),
    (dict(mlp="gelu"), r"^model\.mlp='gelu' cannot hold the source's SwiGLU MLP.*mlp='swiglu'\.$"),
    (dict(pos_emb="learned"), r"^model\.pos_emb='learned' adds a position table.*pos_emb='rope'\.$"),
    (dict(n_embd=32, n_head=2), r"embed_tokens\.weight has shape \(120, 64\) but the target needs "
                                r"\(120, 32\): n_embd differs; set model\.n_embd=64\.$"),
    (dict(vocab_size=99), r"the vocabulary differs; set model\.vocab_size=120\.$"),
    (dict(mlp_hidden=128), r"gate_proj\.weight has shape \(96, 64\) .* set model\.mlp_hidden=96\.$"),
])
def test_targets_the_weights_cannot_fit_are_one_sentence(saved, overrides, match):
    source = load_hf(saved["llama"])
    with pytest.raises(ConvertError, match=match) as error:
        convert_hf(equivalent_config(source, **overrides), source)
    assert one_sentence(str(error.value))


def test_damaged_tensor_is_named(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    directory = tmp_path / "damaged"
    shutil.copytree(saved["llama"], directory)
    path = str(directory / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors[
        "model.layers.1.self_attn.k_proj.weight"][:16]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"^source tensor layers\.1\.self_attn\.k_proj\.weight has "
                                           r"shape \(16, 64\) but config\.json \(hidden_size=64, "
                                           r"num_attention_heads=4, num_key_value_heads=2\) implies "
                                           r"\(32, 64\); the checkpoint in .* is damaged"):
        load_hf(str(directory))


def test_tied_matrix_stored_as_lm_head_only(tmp_path):
    """safetensors keeps a shared tensor once; some checkpoints keep it as lm_head.weight."""
    from safetensors.numpy import load_file, save_file
    model = make_model("qwen2", 2, True, n_layer=1)
    path = os.path.join(save(model, tmp_path / "m"), "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    source = load_hf(str(tmp_path / "m"))
    params, report = convert_hf(equivalent_config(source), source)
    np.testing.assert_array_equal(params["wte"], model.model.embed_tokens.weight.detach().numpy())
    assert report.totals()["dropped"] == 0


# ---- without --config: the source's own model -------------------------------------------------------

def test_equivalent_config_from_config_json(saved, tmp_path):
    expected = ModelConfig(vocab_size=V, block_size=P, n_layer=2, n_head=H, n_embd=E, mlp_hidden=F,
                           norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", bias=True, pos_emb="rope",
                           rope_theta=500.0, tie_embeddings=False, dropout=0.0, head_plan="gqa:2")
    assert equivalent_config(load_hf(saved["qwen2"])) == expected
    assert equivalent_config(load_hf(saved["mistral"])) == \
        ModelConfig(**{**expected.to_dict(), "bias": False, "block_size": P})
    # a transformers 4 config.json: rope_theta at the top, rope_scaling null, defaults left out
    old = edited(saved, tmp_path, "llama", _set(rope_parameters=None, rope_theta=250.0,
                                                rope_scaling=None, tie_word_embeddings=None,
                                                max_position_embeddings=None, head_dim=None))
    cfg = equivalent_config(load_hf(old))
    assert (cfg.rope_theta, cfg.tie_embeddings, cfg.block_size, cfg.bias) == (250.0, False, 2048, False)


def test_cli_without_config_writes_the_source_model(saved, tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from reflex_jax.cli import convert
    directory = saved["qwen2"]
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        os.path.join(directory, "tokenizer.json"))
    out = str(tmp_path / "out")
    assert convert.main(["--hf", directory, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "target: gqa:2 2x4: 4/2kv | 4/2kv" in printed and "new 0;" in printed
    cfg, params = load_params(out)
    source = load_hf(directory)
    assert cfg == equivalent_config(source)
    expected, _ = convert_hf(cfg, source)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    meta = read_checkpoint_meta(out)
    assert meta["source_model_type"] == "qwen2" and meta["tokenizer"] == directory
    assert meta["source_config"]["num_key_value_heads"] == 2 and meta["source_config"]["rope_theta"] == 500
    # overrides apply to the source's model; a window the block size would exceed is one line
    assert convert.main(["--hf", directory, "--out", str(tmp_path / "all"),
                         "--config.model.head_plan=all"]) == 0
    assert load_params(str(tmp_path / "all"))[0].head_plan == "all"
    capsys.readouterr()
    windowed = edited(saved, tmp_path, "mistral", _set(sliding_window=16))
    assert convert.main(["--hf", windowed, "--out", str(tmp_path / "w"),
                         "--config.model.block_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert_weights.py: error: config.json sliding_window=16:") and \
        len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_cli_without_config_reads_gpt2_too(tmp_path):
    from reflex_jax.cli import convert
    from reflex_jax.interop.hf_gpt2 import load_gpt2, matching_config
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8, vocab_size=30))
    directory = save(gpt2, tmp_path / "gpt2")
    assert convert.main(["--hf", directory, "--out", str(tmp_path / "out")]) == 0
    cfg, _ = load_params(str(tmp_path / "out"))
    assert cfg == matching_config(load_gpt2(directory))
    assert (cfg.head_plan, cfg.norm, cfg.pos_emb, cfg.block_size) == ("none", "layernorm", "learned", 8)
