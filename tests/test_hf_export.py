"""The HF trust_remote_code export: the PyTorch port loaded by transformers reproduces the JAX
decoder's logits, greedy generation (cached, uncached, left-padded batches), the self-heads-only
KV cache, and unsupported configs are refused in one sentence. A client of the export gets
sample.py's answer: the chat template gives sample.py's prompt ids for every template, the
generation config decodes as sample.py does, and docs/export.md's snippets print sample.py's
answer; the export prints no transformers advice about a missing torch."""
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from reflex_jax.data import DEFAULT_TEMPLATE, ByteTokenizer, load_tokenizer  # noqa: E402
from reflex_jax.data.templates import chat_template  # noqa: E402
from reflex_jax.errors import ConvertError  # noqa: E402
from reflex_jax.interop.hf_export import hf_tokenizer, write_hf  # noqa: E402
from reflex_jax.model import Decoder, ModelConfig, abstract_params  # noqa: E402
from reflex_jax.model.schedule import LayerPlan  # noqa: E402
from reflex_jax.sampling import Generator  # noqa: E402

V = 96
EXPLICIT = ((), ((0, 2),), ((1, 1), (0, 2)))  # layer 2 reads L1's head 1 and L0's heads 2, 3
# Every building block appears on and off across these: schedules none / all / recent:2,1 /
# explicit, rope and learned positions, rmsnorm+swiglu and layernorm+gelu, tied and untied head,
# biases on and off.
CONFIGS = {
    "all-rope-rms-swiglu-tied-bias": dict(head_plan="all", pos_emb="rope"),
    "recent21-learned-ln-gelu-untied-nobias": dict(head_plan="recent:2,1", norm="layernorm",
                                                   mlp="gelu", tie_embeddings=False, bias=False),
    "none-learned-ln-gelu-tied-bias": dict(head_plan="none", norm="layernorm", mlp="gelu"),
    "explicit-rope-ln-swiglu-untied-bias": dict(head_plan=EXPLICIT, pos_emb="rope", norm="layernorm",
                                                tie_embeddings=False),
    "all-learned-rms-gelu-tied-nobias": dict(head_plan="all", mlp="gelu", bias=False),
    # the head plans of the KV-sharing family (model/plans.py)
    "kv-4-2-1-rope": dict(head_plan="kv:4,2,1", pos_emb="rope"),
    "cla2-value-residual": dict(head_plan="cla:2", value_residual=True),
    "fewer-all-untied": dict(head_plan="fewer:all", tie_embeddings=False),
    "sharev-all-rope": dict(head_plan="sharev:all", pos_emb="rope"),
    "route-value-residual-rope": dict(head_plan="route", value_residual=True, pos_emb="rope"),
}
FAST = {"xla_backend_optimization_level": 0}


def tiny(**kw):
    return ModelConfig(**{**dict(vocab_size=V, block_size=32, n_layer=3, n_head=4, n_embd=32,
                                 mlp_hidden=64), **kw})


@functools.lru_cache(maxsize=None)
def random_params(cfg):
    """Random norm scales and biases, unit-scale embeddings and 1/sqrt(fan-in) kernels: logits of
    several units, far from ties. Drawn with numpy onto the abstract tree (eager flax init of
    even a tiny model takes seconds)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    rng = np.random.default_rng(1)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):
            out.append(1.0 + 0.3 * noise)
        elif name.endswith("['bias']"):
            out.append(0.3 * noise)
        elif name in ("['wte']", "['wpe']", "['lm_head']"):
            out.append(noise)
        else:  # a kernel: inputs are its leading axes ([E, ...] or o's [H, D, E])
            fan_in = leaf.shape[0] * (leaf.shape[1] if name.endswith("['o']['kernel']") else 1)
            out.append(noise / np.sqrt(fan_in))
    return jax.tree_util.tree_unflatten(tree, [x.astype(np.float32) for x in out])


@functools.lru_cache(maxsize=None)
def exported(name, tmp_root):
    cfg = tiny(**CONFIGS[name])
    out = write_hf(cfg, random_params(cfg), os.path.join(tmp_root, name), meta={"run": name})
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    return cfg, out, model.eval()


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_the_jax_decoder(name, tmp_root):
    cfg, out, model = exported(name, tmp_root)
    batch = tokens(0, (2, 20))
    want = np.asarray(jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t),
                              compiler_options=FAST)(random_params(cfg), batch))
    with torch.no_grad():
        got = model(torch.tensor(batch), use_cache=False).logits.numpy()
    assert got.dtype == np.float32 and np.abs(want).max() > 5.0  # far from a trivial model
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    config = json.load(open(os.path.join(out, "config.json")))
    assert ModelConfig.from_dict(config["reflex_model"]) == cfg
    assert [p["n_self"] for p in config["layer_plan"]] == [p.n_self for p in cfg.layers]
    assert [p["n_kv"] for p in config["layer_plan"]] == [p.n_kv for p in cfg.layers]
    assert config["layer_plan"][-1]["cross"] == [
        {"source": g.source, "n_heads": g.n_heads, "source_heads": list(g.source_heads),
         "share": g.share, "mixture": [list(m) for m in g.mixture]} for g in cfg.layers[-1].cross]
    assert json.load(open(os.path.join(out, "reflex_meta.json"))) == {"run": name}


def test_tensor_names_and_layouts(tmp_root):
    cfg, out, _ = exported("recent21-learned-ln-gelu-untied-nobias", tmp_root)
    t, p = load_file(os.path.join(out, "model.safetensors")), random_params(cfg)
    n_self = [plan.n_self for plan in cfg.layers]  # 4, 2, 1
    assert t["model.layers.2.attn.k.weight"].shape == (n_self[2] * 8, 32)
    np.testing.assert_array_equal(t["model.layers.1.attn.q.weight"],
                                  np.asarray(p["h_1"]["attn"]["q"]["kernel"]).reshape(32, -1).T)
    np.testing.assert_array_equal(t["model.layers.0.attn.o.weight"],
                                  np.asarray(p["h_0"]["attn"]["o"]["kernel"]).reshape(-1, 32).T)
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(p["lm_head"]).T)
    assert not any(k.endswith(".bias") for k in t)  # bias=False: none, not even LayerNorm's
    names = {n: set(load_file(os.path.join(exported(n, tmp_root)[1], "model.safetensors")))
             for n in ("all-rope-rms-swiglu-tied-bias", "none-learned-ln-gelu-tied-bias")}
    rope, gpt2 = names["all-rope-rms-swiglu-tied-bias"], names["none-learned-ln-gelu-tied-bias"]
    assert "lm_head.weight" not in rope | gpt2  # tied: the head is model.wte.weight
    assert "model.wpe.weight" not in rope and "model.wpe.weight" in gpt2
    assert "model.layers.0.attn.q.bias" in rope and "model.ln_f.bias" not in rope  # RMSNorm: none
    assert {"model.ln_f.bias", "model.layers.2.mlp.fc.weight"} <= gpt2


PROMPTS = [tokens(1, 5).tolist(), tokens(2, 9).tolist(), tokens(3, 2).tolist()]


def left_padded(prompts):
    P = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), P), np.int64), np.zeros((len(prompts), P), np.int64)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):], mask[r, P - len(p):] = p, 1
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("name", ["all-rope-rms-swiglu-tied-bias",
                                  "recent21-learned-ln-gelu-untied-nobias",
                                  "route-value-residual-rope", "cla2-value-residual"])
def test_greedy_generate_matches_jax_cached_uncached_and_left_padded(name, tmp_root):
    cfg, _, model = exported(name, tmp_root)
    want = Generator(cfg, compiler_options=FAST).generate(random_params(cfg), PROMPTS,
                                                          max_new_tokens=8, temperature=0.0)
    ids, mask = left_padded(PROMPTS)
    runs = {}
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                 use_cache=use_cache, pad_token_id=0)
        runs[use_cache] = out[:, ids.shape[1]:].tolist()
    assert runs[True] == want and runs[False] == want
    assert len({tuple(r) for r in want}) == len(want)  # the rows really differ
    with torch.no_grad():  # each prompt alone, unpadded, gives its row of the batch
        alone = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8,
                                pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert alone == want


def test_cache_holds_only_each_layers_self_heads(tmp_root):
    cfg, _, model = exported("explicit-rope-ln-swiglu-untied-bias", tmp_root)
    with torch.no_grad():
        cache = model(torch.tensor(tokens(4, (2, 7))), use_cache=True).cache
    shapes = [tuple(layer.keys.shape) for layer in cache.layers]
    assert shapes == [(2, p.n_self, 7, 8) for p in cfg.layers] == [(2, 4, 7, 8), (2, 2, 7, 8),
                                                                     (2, 1, 7, 8)]
    assert [tuple(layer.values.shape) for layer in cache.layers] == shapes
    # the general plans: what each layer computes (a borrowing layer nothing, GQA its K/V heads)
    for name, heads in (("cla2-value-residual", [4, 0, 4]), ("kv-4-2-1-rope", [4, 2, 1])):
        cfg, _, model = exported(name, tmp_root)
        with torch.no_grad():
            cache = model(torch.tensor(tokens(4, (2, 7))), use_cache=True).cache
        assert [layer.keys.shape[1] for layer in cache.layers] == heads == [p.n_k for p in cfg.layers]


def _with_plan(cfg, layer, plan):
    """`cfg` with one resolved layer plan replaced (what a new head-plan variant would produce)."""
    layers = list(cfg.layers)
    layers[layer] = plan
    cfg.__dict__["layers"] = tuple(layers)  # the cached_property's slot
    return cfg


@dataclasses.dataclass(frozen=True)
class WindowedPlan(LayerPlan):
    window: int = 0


def test_unsupported_configs_are_refused_in_one_sentence(tmp_path):
    cfg = tiny(head_plan="all")
    params = random_params(cfg)
    odd = tiny(head_plan="all")
    object.__setattr__(odd, "norm", "scalenorm")
    with pytest.raises(ConvertError, match=r"does not support model.norm='scalenorm'; it ports "
                                           r"rmsnorm \| layernorm only\."):
        write_hf(odd, params, str(tmp_path / "a"))
    windowed = _with_plan(tiny(head_plan="all"), 2, WindowedPlan(2, 2, cfg.layers[2].cross, window=4))
    with pytest.raises(ConvertError, match=r"model.head_plan='all': layer 2 sets window=4; the "
                                           r"PyTorch port covers the head plans of "
                                           r"docs/attention.md#head-plans only\.$"):
        write_hf(windowed, params, str(tmp_path / "c"))
    assert not os.listdir(tmp_path)  # nothing written


def test_byte_tokenizer_is_saved_with_the_same_ids(tmp_path):
    hf_tokenizer("bytes", tiny(vocab_size=259)).save_pretrained(str(tmp_path))
    tok, ref = AutoTokenizer.from_pretrained(str(tmp_path)), ByteTokenizer()
    text = "Сколько будет 13 плюс 19?\n ok"
    assert tok(text)["input_ids"] == ref.encode(text)  # nothing added: no bos, no eos
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.decode(ref.encode(text)) == text
    cfg = tiny()
    with pytest.raises(ConvertError, match=r"tokenizer 'bytes' has 259 tokens but the model has "
                                           r"vocab_size=96; export with the tokenizer"):
        write_hf(cfg, random_params(cfg), str(tmp_path / "small"), tokenizer="bytes")
    assert not (tmp_path / "small").exists()


@pytest.mark.slow
def test_convert_weights_exports_a_params_directory(tmp_path, capsys):
    """`convert_weights.py --export hf|original --run DIR`: the run's model (and its tokenizer, named
    in meta.json) leaves in both formats, and a model the original cannot express is one sentence."""
    from reflex_jax.checkpoint import save_params
    from reflex_jax.cli import convert
    cfg = tiny(vocab_size=259, head_plan="all", norm_eps=1e-6, mlp_hidden=None)
    params = random_params(cfg)
    run = str(tmp_path / "params")
    save_params(run, cfg, params, meta={"tokenizer": "bytes"})
    assert convert.main(["--export", "hf", "--run", run, "--out", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    tokens = np.array([ByteTokenizer().encode("Привет, мир")], np.int32)
    want = np.asarray(Decoder(cfg).apply({"params": params}, tokens))
    with torch.no_grad():
        got = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.max(np.abs(got - want)) < 1e-4
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert tok("мир")["input_ids"] == list("мир".encode())
    assert convert.main(["--export", "original", "--run", run, "--out", str(tmp_path / "orig")]) == 0
    assert sorted(os.listdir(tmp_path / "orig")) == ["config.json", "model.safetensors"]
    capsys.readouterr()
    other = str(tmp_path / "gelu")
    gelu = tiny(mlp="gelu", norm_eps=1e-6, mlp_hidden=None)
    save_params(other, gelu, random_params(gelu))
    assert convert.main(["--export", "original", "--run", other, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert_weights.py: error: model.mlp='gelu'") and "\n" not in err


# ---- what a transformers client needs: sample.py's prompt ids and decoding ----------------------

QUESTIONS = ["Сколько будет 13 плюс 19?", "2+2", "a {{ b }} {% raw %} \\n \"q\" {# c #}"]
# the default, one without text before the question, and one whose literals hold what Jinja and
# format strings treat specially: quotes, backslashes, braces ({{ }} is one brace), block, comment
# and raw-block markers, a tab, a CR-LF, a character outside the BMP, the question twice
TEMPLATES = [DEFAULT_TEMPLATE, "{question} => {answer}",
             'Q: "{question}" \\ }} %}} {{% #}} {{#}} {{{{- y -}}}} {{%- raw -%}}\t😀\r\n{question}?'
             "\nA: {answer}"]
sample_cli = pytest.importorskip("reflex_jax.cli.sample")


def bpe_tokenizer(directory: str) -> str:
    """A byte-level BPE tokenizer (rugpt3's kind: merges, prefix spaces, bos/eos/pad) trained on a
    few lines and saved as transformers files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"Вопрос: Сколько будет {a} плюс {b}?\n### Ответ: {a + b}"
                             for a in range(20) for b in range(20)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


def chat_ids(tok, messages, **kw):
    return tok.apply_chat_template(messages, add_generation_prompt=True, **kw)["input_ids"]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_chat_template_gives_sample_pys_prompt_ids(tokenizer, tmp_path):
    """apply_chat_template on the export's tokenizer = the ids `sample.py --template instruct`
    feeds, for every template; the bare text = what `--template none` feeds."""
    name = "bytes" if tokenizer == "bytes" else bpe_tokenizer(str(tmp_path / "bpe"))
    cfg = tiny(vocab_size=512)
    out = write_hf(cfg, random_params(cfg), str(tmp_path / "hf"), tokenizer=name,
                   template=DEFAULT_TEMPLATE)
    assert os.path.isfile(os.path.join(out, "chat_template.jinja"))
    tok, ref = AutoTokenizer.from_pretrained(out, trust_remote_code=True), load_tokenizer(name)
    for template in TEMPLATES:
        if template != DEFAULT_TEMPLATE:  # the exported one is checked as written
            tok.chat_template = chat_template(template)
        for q in QUESTIONS:
            user = [{"role": "user", "content": q}]
            want = sample_cli._instruct(ref, [q], template)[0]
            assert want[0] == ref.bos_id and len(want) > len(ref.encode(q)) + 1
            assert chat_ids(tok, user, sanitize_control_tokens=True) == want
            assert tok(q)["input_ids"] == ref.encode(q)  # --template none: the raw text
            # answered turns before the question are training rows (bos + row + eos)
            row = [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"}]
            rendered = template.replace("{question}", "2+3").replace("{answer}", "5")
            rendered = rendered.replace("{{", "{").replace("}}", "}")
            assert chat_ids(tok, row + user) == [ref.bos_id, *ref.encode(rendered), ref.eos_id,
                                                 *want]
    # a special token's text in a question: the byte tokenizer encodes it as bytes (transformers
    # does with sanitize_control_tokens), a transformers tokenizer as the special token
    tok.chat_template = chat_template(DEFAULT_TEMPLATE)
    special = [{"role": "user", "content": "<s>"}]
    want = sample_cli._instruct(ref, ["<s>"], DEFAULT_TEMPLATE)[0]
    assert want.count(ref.bos_id) == (1 if tokenizer == "bytes" else 2)
    assert chat_ids(tok, special, sanitize_control_tokens=tokenizer == "bytes") == want
    with pytest.raises(Exception, match=r"trained on questions \(role user\) and answers \(role "
                                        r"assistant\) only; drop the system message"):
        tok.apply_chat_template([{"role": "system", "content": "be brief"}] + user)


def test_plain_templates_give_no_chat_template_and_a_greedy_generation_config(tmp_path):
    """Text data (no template) and templates without {question}/{answer} ask no question: no chat
    template. generation_config.json: greedy, the tokenizer's ids, block_size tokens at most."""
    from transformers import GenerationConfig
    cfg = tiny(vocab_size=259)
    assert chat_template(None) is None and chat_template("") is None
    for k, template in enumerate([None, "{context}\n{question}: {answer}", "{text}{answer}"]):
        out = write_hf(cfg, random_params(cfg), str(tmp_path / str(k)), tokenizer="bytes",
                       template=template)
        assert not os.path.exists(os.path.join(out, "chat_template.jinja"))
        assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).chat_template is None
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.do_sample, gen.max_length, gen.bos_token_id, gen.eos_token_id,
            gen.pad_token_id) == (False, cfg.block_size, 257, 258, 256)
    bare = write_hf(cfg, random_params(cfg), str(tmp_path / "bare"))  # no tokenizer: no ids
    assert json.load(open(os.path.join(bare, "generation_config.json"))) == {
        "do_sample": False, "max_length": cfg.block_size}


def _stderr_without_torch(code: str, cwd: str) -> str:
    """stderr of `code` run in a fresh interpreter where torch cannot be imported (as after
    `pip install -e .`, which brings transformers but not torch)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    run = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.mark.slow
def test_export_prints_no_pytorch_advice(tmp_path):
    """Without torch, importing transformers advises installing it; `convert_weights.py --export
    hf` needs no torch and must not print that advice."""
    from reflex_jax.checkpoint import save_params
    advice = "PyTorch was not found"
    assert advice in _stderr_without_torch("import transformers", str(tmp_path))  # the control
    cfg = tiny(vocab_size=259)
    save_params(str(tmp_path / "run"), cfg, random_params(cfg),
                meta={"tokenizer": "bytes", "template": DEFAULT_TEMPLATE})
    err = _stderr_without_torch(
        "from reflex_jax.cli import convert\n"
        "assert convert.main(['--export', 'hf', '--run', 'run', '--out', 'hf']) == 0",
        str(tmp_path))
    assert advice not in err and "[transformers]" not in err, err
    assert os.path.isfile(tmp_path / "hf" / "chat_template.jinja")
    assert os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS") is None  # set around the import only


DOC_DIR, DOC_QUESTION = "export/tiny", "Сколько будет 13 плюс 19?"


def doc_snippets() -> list[str]:
    """The python blocks of docs/export.md that load DOC_DIR (the client's code)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "export.md"),
              encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    snippets = [b for b in blocks if DOC_DIR in b]
    assert len(snippets) == 2 and all(DOC_QUESTION in b for b in snippets)
    return snippets


def answering_params(cfg):
    """random_params with untied head whose eos column is a scaled copy of a token's that the
    model emits early: greedy rows then stop at eos after differing numbers of tokens, as a
    trained model's answers do."""
    params = jax.tree_util.tree_map(np.array, random_params(cfg))
    tok = ByteTokenizer()
    first = Generator(cfg, compiler_options=FAST).generate(
        params, [sample_cli._instruct(tok, [q], DEFAULT_TEMPLATE)[0] for q in QUESTIONS],
        max_new_tokens=8, temperature=0.0)
    params["lm_head"][:, tok.eos_id] = 1.05 * params["lm_head"][:, first[0][3]]
    return params


@pytest.mark.slow
def test_docs_snippets_print_sample_pys_answer(tmp_path):
    """The exported run answers a transformers client exactly as `sample.py --template instruct`
    does (greedy, its default): docs/export.md's two snippets (pipeline, and apply_chat_template +
    generate), run as written on the export, print sample.py's completion for each question, and
    the pipeline's token ids are sample.py's prompt and new ids followed by eos."""
    from reflex_jax.checkpoint import save_params
    from reflex_jax.cli import convert
    cfg = tiny(vocab_size=259, block_size=128, tie_embeddings=False)
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    save_params(run, cfg, answering_params(cfg),
                meta={"tokenizer": "bytes", "template": DEFAULT_TEMPLATE})
    assert convert.main(["--export", "hf", "--run", run, "--out", out]) == 0
    args = ["--run", run, "--template", "instruct"] + [a for q in QUESTIONS for a in ("--prompt", q)]
    rows = [line.split(" | ") for line in
            sample_cli.generate_lines(sample_cli.parse_args(args + ["--print_tokens"]))]
    rows = [([int(t) for t in p.split(",")], [int(t) for t in n.split(",") if t]) for p, n in rows]
    texts = sample_cli.generate_lines(sample_cli.parse_args(args))[::2]  # between: "-" * 40
    assert len({len(new) for _, new in rows}) > 1  # rows stop at eos after different lengths
    assert any(len(p) + len(new) < cfg.block_size for p, new in rows)
    tok = ByteTokenizer()
    for (prompt, new), text, q in zip(rows, texts, QUESTIONS):
        namespace = {}
        for code in doc_snippets():
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(code.replace(DOC_DIR, out).replace(f'"{DOC_QUESTION}"', repr(q)),
                     namespace)
            assert tok.decode(prompt) + printed.getvalue()[:-1] == text  # print adds a newline
        got = namespace["chat"](namespace["messages"], return_tensors=True)[0]
        stopped = len(prompt) + len(new) < cfg.block_size
        assert got["generated_token_ids"] == prompt + new + ([tok.eos_id] if stopped else [])
