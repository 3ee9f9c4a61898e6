"""KV-cache generation: the cache reproduces the full forward pass, holds only self heads,
and batched, left-padded generation gives every row what it would get alone."""
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import Decoder, ModelConfig, init_params, sampling
from reflex_jax.checkpoint import save_params
from reflex_jax.sampling import (GenerationError, Generator, bucket, filter_logits,
                                 generate, prefill)

from decode_check import FAST, cached_and_full_logits
from marks import fast_only
from tolerance import order_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPLICIT = ((), ((0, 3),), ((1, 2), (0, 3)), ((2, 1), (1, 2), (0, 4)))
PRESETS = ["none", "all", "recent:2,1", EXPLICIT]
N_SELF = {"none": [8, 8, 8, 8], "all": [8, 7, 6, 5], "recent:2,1": [8, 6, 5, 5],
          EXPLICIT: [8, 5, 3, 1]}


def tiny(reflex="all", pos_emb="learned", **kw):
    base = dict(vocab_size=259, block_size=48, n_layer=4, n_head=8, n_embd=64, head_plan=reflex,
                pos_emb=pos_emb)
    base.update(kw)
    return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def tiny_params(cfg):
    # Scaled-up random weights: sharper attention and logits far from ties, so the checks bite
    # (default-init tied embeddings just repeat the last token).
    params = init_params(cfg, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda x: x * 4.0, params)


def rand_tokens(seed, n, vocab=259):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# Generation tests share a few configs and bucket shapes (batch 1 or 4, prompt bucket 8, cache
# bucket 32), so the compiled loops are reused across tests: compiling dominates this file's time.
PROMPTS = [rand_tokens(1, 5), rand_tokens(2, 8), rand_tokens(3, 1), rand_tokens(4, 7)]
GEN = ("all", "rope")


# Test-only compiles skip LLVM's optimisations: half the compile time, and compiling is most of it.


@functools.lru_cache(maxsize=None)
def full_forward(cfg):
    return jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t), compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def gen(cfg):
    return Generator(cfg, compiler_options=FAST)


@pytest.mark.parametrize("pos_emb", fast_only(["learned", "rope"], "learned"))
@pytest.mark.parametrize("reflex", fast_only(PRESETS, "none", "all"), ids=str)
def test_prefill_and_decode_match_full_forward(reflex, pos_emb):
    """Left-padded rows of different prompt lengths, prefilled, then fed one token at a time."""
    cfg = tiny(reflex, pos_emb)
    prompt_lens, n_decode = [4, 9, 1], 6
    seqs = [rand_tokens(10 + r, n + n_decode) for r, n in enumerate(prompt_lens)]
    for got, ref in cached_and_full_logits(cfg, tiny_params(cfg), seqs, prompt_lens, n_decode, 16):
        np.testing.assert_allclose(got, ref, atol=order_atol(ref, cfg.n_layer), rtol=0)


@pytest.mark.parametrize("reflex", PRESETS, ids=str)
def test_cache_holds_only_self_heads(reflex):
    cfg, vanilla = tiny(reflex), tiny("none")
    B, P, S = 2, 8, 32

    def cache_of(c):
        args = (jax.ShapeDtypeStruct((B, P), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))
        abstract = jax.eval_shape(lambda: init_params(c, jax.random.PRNGKey(0)))
        return jax.eval_shape(lambda p, t, pad: prefill(c, p, t, pad, S)[1], abstract, *args)

    cache = cache_of(cfg)
    assert len(cache) == cfg.n_layer
    for layer, (k, v) in enumerate(cache):
        want = (B, N_SELF[reflex][layer], S, cfg.head_dim)  # head-major
        assert k.shape == want and v.shape == want, (layer, k.shape)
    def nbytes(c):
        return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(c))
    ratio = nbytes(cache) / nbytes(cache_of(vanilla))
    assert ratio == pytest.approx(sum(N_SELF[reflex]) / (cfg.n_layer * cfg.n_head))
    assert ratio == pytest.approx(cfg.kv_heads_total / (cfg.n_layer * cfg.n_head))


def loop_body_copies(hlo_text: str, min_elements: int) -> list[str]:
    """The copy instructions of at least `min_elements` elements in the bodies of the module's
    while loops (the decode loop)."""
    copies = []
    for body in re.findall(r"body=%([\w.\-]+)", hlo_text):
        block = re.search(rf"^%{re.escape(body)} .*?\{{\n(.*?)\n\}}", hlo_text, re.S | re.M).group(1)
        for line in block.splitlines():
            m = re.search(r"= \w+\[([\d,]*)\]\S* copy\(", line)
            if m and np.prod([int(d) for d in m.group(1).split(",") if d]) >= min_elements:
                copies.append(line.strip())
    return copies


@pytest.mark.parametrize("reflex,batch", [("all", 1), ("gqa:8", 4)], ids=str)
def test_decode_loop_updates_the_cache_in_place(reflex, batch):
    """No decode step copies a cache array: at batch 1 or with one K/V head XLA used to copy every
    layer's K and V cache four times per token (the cache is carried without its unit axes)."""
    cfg = tiny(reflex)
    g, P, S = gen(cfg), 8, 32
    settings = dict(max_new=np.int32(S - P), temperature=np.float32(1e-6), top_k=np.int32(0),
                    top_p=np.float32(1.0), seed=np.uint32(0), stop_K=np.full((1,), -1, np.int32),
                    pad_id=np.int32(0), greedy=True, filtered=False)
    text = g._loop.lower(tiny_params(cfg), np.ones((batch, P), np.int32), np.zeros((batch,), np.int32),
                         np.ones((batch,), bool), np.zeros((batch, S - P), np.int32), np.int32(0),
                         **settings).compile().as_text()
    assert "while" in text
    assert loop_body_copies(text, S * cfg.head_dim) == []


def greedy_reference(cfg, params, prompt, n):
    """Greedy decoding without a cache: the full forward pass over the whole prefix every token."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, cfg.block_size), np.int32)  # right padding: causal, so harmless
        buf[0, :len(seq)] = seq
        seq.append(int(np.argmax(full_forward(cfg)(params, buf)[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("reflex,pos_emb", fast_only([GEN, (EXPLICIT, "learned")], GEN, unpack=True),
                         ids=str)
def test_batched_equals_one_by_one_equals_uncached_greedy(reflex, pos_emb):
    cfg = tiny(reflex, pos_emb)
    params = tiny_params(cfg)
    batched = gen(cfg).generate(params, PROMPTS, max_new_tokens=10)
    alone = [gen(cfg).generate(params, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(row) == 10 for row in batched)
    assert len(set(map(tuple, batched))) == len(batched)  # the rows really differ
    for prompt, row in zip(PROMPTS, batched):
        assert row == greedy_reference(cfg, params, prompt, 10)


def test_greedy_is_deterministic_and_reuses_compiled_loop():
    cfg = tiny(*GEN)
    params, g = tiny_params(cfg), gen(cfg)
    first = g.generate(params, [PROMPTS[0]], max_new_tokens=10)
    compiles = g.compiles
    assert g.generate(params, [PROMPTS[0]], max_new_tokens=10) == first
    other = g.generate(params, [PROMPTS[3]], max_new_tokens=9)  # same buckets
    assert len(other[0]) == 9 and other[0] != first[0][:9]
    assert g.compiles == compiles  # a new prompt length or max_new_tokens did not recompile
    g.generate(params, [PROMPTS[1]], max_new_tokens=10, temperature=0.8, seed=1)
    assert g.compiles <= compiles + 1  # sampling is one more compiled mode...
    g.generate(params, [PROMPTS[2]], max_new_tokens=9, temperature=1.3, seed=5)
    assert g.compiles <= compiles + 1  # ...whatever the temperature and seed


def test_buckets():
    assert [bucket(n, 48) for n in (1, 8, 9, 17, 33, 48, 50)] == [8, 8, 16, 32, 48, 48, 50]


def _cut(row, eos):
    return row[:row.index(eos)] if eos in row else row


def test_per_row_eos_stop_and_early_exit():
    cfg = tiny(*GEN)
    params = tiny_params(cfg)
    g = gen(cfg)
    base = g.generate(params, [PROMPTS[0]], max_new_tokens=10)[0]
    # Rows 1-3 are row 0 continued by its own first 2, 1, 3 greedy tokens: they must continue it.
    prompts = [PROMPTS[0]] + [PROMPTS[0] + base[:k] for k in (2, 1, 3)]
    free = g.generate(params, prompts, max_new_tokens=10)
    assert [row[:10 - k] for row, k in zip(free, (0, 2, 1, 3))] == [base[k:] for k in (0, 2, 1, 3)]
    eos = base[4]
    assert eos not in base[:4]  # holds for these weights; keeps the expected cut simple
    stopped = g.generate(params, prompts, max_new_tokens=10, eos_id=eos)
    assert stopped == [base[:4], base[2:4], base[1:4], base[3:4]]
    assert g.last_steps == 5  # every row has hit eos by the 5th token: the loop stopped there
    mixed = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    free = g.generate(params, mixed, max_new_tokens=10)
    stopped = g.generate(params, mixed, max_new_tokens=10, eos_id=eos)
    assert stopped == [_cut(row, eos) for row in free] and stopped[1] == base[:4]
    assert g.last_steps == max(min(10, len(row) + 1) for row in stopped)
    # Several stop ids (as the original notebooks used): each row stops at the first of any.
    first, second = base[4], base[2]
    assert second not in base[:2] + base[3:5]  # holds for these weights
    several = g.generate(params, prompts, max_new_tokens=10, stop_ids=[first, second])
    assert several == [base[:2], [], base[1:2], base[3:4]]
    assert g.generate(params, prompts, max_new_tokens=10, eos_id=first, stop_ids=[second]) == several
    with pytest.raises(GenerationError, match="stop id 999 is outside the model's vocab"):
        g.generate(params, prompts, max_new_tokens=10, stop_ids=[999])


def test_sampling_seeded_filtered_and_independent_of_batch_mates():
    cfg = tiny(*GEN)
    params, g = tiny_params(cfg), gen(cfg)
    kw = dict(max_new_tokens=10, temperature=1.5)
    a = g.generate(params, PROMPTS, seed=7, **kw)
    assert a == g.generate(params, PROMPTS, seed=7, **kw)
    assert a != g.generate(params, PROMPTS, seed=8, **kw)
    # Row r's draws depend on (seed, r, step), not on what the other rows hold.
    mates = g.generate(params, [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[1]], seed=7, **kw)
    assert mates[0] == a[0] and mates[1] != a[1]
    greedy = g.generate(params, PROMPTS, max_new_tokens=10)
    assert a != greedy
    assert g.generate(params, PROMPTS, seed=3, top_k=1, **kw) == greedy
    assert g.generate(params, PROMPTS, seed=3, top_p=1e-6, **kw) == greedy
    assert g.generate(params, PROMPTS, seed=3, top_k=50, top_p=0.9, **kw) != greedy


@pytest.mark.slow
def test_chunked_generation_equals_one_batch_and_bounds_the_batch():
    """batch_size splits the rows into chunks of one compiled shape; every row gets what it gets
    in one batch (greedy, seeded sampling, eos stops), and no compiled batch exceeds batch_size."""
    cfg = tiny(*GEN)
    params, g = tiny_params(cfg), gen(cfg)
    base = g.generate(params, [PROMPTS[0]], max_new_tokens=10)[0]
    eos = base[4]
    runs = [dict(max_new_tokens=10), dict(max_new_tokens=10, temperature=1.5, seed=7),
            dict(max_new_tokens=10, eos_id=eos)]
    whole = [g.generate(params, PROMPTS, **kw) for kw in runs]
    assert whole[1] != whole[0] and whole[2] != whole[0]  # sampling and eos really change rows
    before = len(g.compiled_shapes)
    # 4 rows in chunks of 3: rows 0-2, then row 3 (with 2 filler rows), both at batch bucket 3
    assert [g.generate(params, PROMPTS, batch_size=3, **kw) for kw in runs] == whole
    assert set(g.compiled_shapes[before:]) <= {(3, 8, 32)}
    assert len(g.compiled_shapes) - before <= 2  # one compile per mode, shared by the chunks
    assert g.last_steps == max(min(10, len(row) + 1) for row in whole[2])
    # one row at a time: row r still draws with key (seed, r, step), so sampling agrees too
    assert [g.generate(params, PROMPTS, batch_size=1, **kw) for kw in runs] == whole
    assert max(b for b, _, _ in g.compiled_shapes[before:]) <= 3
    assert g.generate(params, PROMPTS, batch_size=64, **runs[1]) == whole[1]  # larger: one batch
    with pytest.raises(GenerationError, match=r"batch_size=0 must be a positive integer"):
        g.generate(params, PROMPTS, batch_size=0, **runs[0])


def test_filter_logits():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.05, 0.3, 0.15]]))
    def kept(k, p):
        return np.isfinite(np.asarray(filter_logits(logits, k, p)[0])).nonzero()[0].tolist()
    assert kept(0, 1.0) == [0, 1, 2, 3, 4]
    assert kept(2, 1.0) == [1, 3]
    assert kept(0, 0.5) == [1, 3]        # 0.4 < 0.5, so 0.3 is needed too
    assert kept(0, 0.4) == [1]           # 0.4 alone reaches 0.4
    assert kept(0, 0.81) == [1, 3, 4]    # 0.4 + 0.3 = 0.7 < 0.81, so 0.15 too
    assert kept(3, 0.81) == [1, 3]       # top-3 renormalised first: (0.4 + 0.3) / 0.85 = 0.82


def test_prompt_plus_new_tokens_must_fit_block_size():
    cfg = tiny(*GEN)  # block_size 48
    params = tiny_params(cfg)
    prompt = rand_tokens(5, 40)
    with pytest.raises(GenerationError, match=r"prompt 1 has 40 tokens and max_new_tokens=9, "
                                              r"together 49 > block_size=48"):
        gen(cfg).generate(params, [PROMPTS[0], prompt], max_new_tokens=9)
    out = gen(cfg).generate(params, [prompt], max_new_tokens=8)  # exactly block_size: fine
    assert out[0] == greedy_reference(cfg, params, prompt, 8)


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "no prompts given"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    (["hello"], {}, "prompts must be lists of token ids; encode text"),
    ([[1, 300]], {}, "token id 300 outside the model's vocab 0..258"),
    ([[1]], {"max_new_tokens": -1}, "max_new_tokens=-1 must be a non-negative integer"),
    ([[1]], {"temperature": -0.5}, "temperature=-0.5 must be a finite number >= 0"),
    ([[1]], {"top_k": -2}, "top_k=-2 must be >= 0"),
    ([[1]], {"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ([[1]], {"eos_id": 259}, "eos_id=259 is outside the model's vocab"),
])
def test_bad_requests_name_the_fix(prompts, kw, match):
    cfg = tiny(*GEN)
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(GenerationError, match=match):
        generate(cfg, tiny_params(cfg), prompts, **kw)


def test_zero_new_tokens():
    cfg = tiny(*GEN)
    assert generate(cfg, tiny_params(cfg), PROMPTS[:2], max_new_tokens=0) == [[], []]


# ---- sample.py ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
    cfg = tiny(*GEN)  # the same config as above, so in-process runs reuse its compiled loops
    path = tmp_path_factory.mktemp("tiny_params")
    save_params(str(path), cfg, tiny_params(cfg), meta={"tokenizer": "bytes"})
    return str(path), cfg


@pytest.fixture
def sample_main(monkeypatch):
    """sample.main, in process; its generate() reuses this file's fast-compiled Generator."""
    monkeypatch.setitem(sampling._GENERATORS, tiny(*GEN), gen(tiny(*GEN)))
    from reflex_jax.cli.sample import main
    return main


def _ids(text):
    return ",".join(map(str, text))


@pytest.mark.slow
def test_sample_py_end_to_end(params_dir):
    path, cfg = params_dir
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--run", path, "--prompt", "Hi",
         "--template", "instruct", "--max_new_tokens", "8", "--print_tokens"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    prompt_s, out_s = lines[0].split(" | ")
    prompt = [int(t) for t in prompt_s.split(",")]
    # bos + UTF-8 bytes of the instruct template
    assert prompt == [257] + list("Вопрос: Hi\n### Ответ: ".encode("utf-8"))
    out = [int(t) for t in out_s.split(",") if t]
    assert out == gen(cfg).generate(tiny_params(cfg), [prompt], max_new_tokens=8, eos_id=258)[0]


def test_sample_py_text_and_token_prompts(params_dir, sample_main, capsys):
    path, cfg = params_dir
    main, params = sample_main, tiny_params(cfg)
    assert main(["--run", path, "--prompt", "hello", "--max_new_tokens", "10"]) == 0
    want = generate(cfg, params, [list(b"hello")], max_new_tokens=10, eos_id=258)[0]
    assert capsys.readouterr().out == "hello" + bytes(t for t in want if t < 256).decode(
        "utf-8", errors="replace") + "\n"
    rows = ["--prompt_tokens=" + _ids(p) for p in PROMPTS]
    assert main(["--run", path, *rows, "--max_new_tokens", "10", "--print_tokens",
                 "--temperature", "1.5", "--seed", "7"]) == 0
    want = generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=1.5, seed=7, eos_id=258)
    assert capsys.readouterr().out.splitlines() == [f"{_ids(p)} | {_ids(o)}"
                                                    for p, o in zip(PROMPTS, want)]


def test_sample_py_batch_size_runs_chunks_with_the_same_output(params_dir, sample_main, capsys):
    path, cfg = params_dir
    g = gen(cfg)
    rows = ["--prompt_tokens=" + _ids(p) for p in PROMPTS]
    argv = ["--run", path, *rows, "--max_new_tokens", "10", "--print_tokens", "--temperature",
            "1.5", "--seed", "7"]
    assert sample_main(argv) == 0
    whole = capsys.readouterr().out
    before = len(g.compiled_shapes)
    assert sample_main(argv + ["--batch_size", "3"]) == 0
    assert capsys.readouterr().out == whole
    assert all(b <= 3 for b, _, _ in g.compiled_shapes[before:])
    assert sample_main(argv + ["--batch_size", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("sample.py: error: --batch_size 0 must be at least 1 "
                                               "(the most prompts generated at once).")


@pytest.mark.slow
def test_sample_py_errors(params_dir, sample_main, tmp_path, capsys):
    path, cfg = params_dir
    main = sample_main
    small_vocab = tiny("all", "learned", vocab_size=200)
    mismatch = save_params(str(tmp_path / "v200"), small_vocab,
                           init_params(small_vocab, jax.random.PRNGKey(0)),
                           meta={"tokenizer": "bytes"})
    no_tok = save_params(str(tmp_path / "notok"), cfg, tiny_params(cfg))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--run", str(tmp_path / "empty"), "--prompt", "x"], "has no model_config.json"),
        (["--run", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["--run", mismatch, "--prompt", "x"],
         "tokenizer 'bytes' has 259 tokens but the model in .* has vocab_size=200"),
        (["--run", no_tok, "--prompt", "x"], "names no tokenizer in meta.json; pass --tokenizer"),
        (["--run", path], "no prompt given"),
        (["--run", path, "--prompt", "x", "--prompt_tokens", "1"], "not both"),
        (["--run", path, "--prompt_tokens", "1,a"], "is not a comma-separated list"),
        (["--run", path, "--prompt_tokens", "1", "--template", "instruct"], "text prompts only"),
        (["--run", path, "--prompt_file", str(tmp_path / "nope.txt")], "does not exist"),
        (["--run", path, "--prompt", "x" * 45, "--max_new_tokens", "8"],
         "together 53 > block_size=48; shorten the prompt"),
        (["--run", path, "--prompt", "x" * 48], "has 48 tokens, which fills the model's block_size=48"),
        (["--run", path, "--prompt", "x", "--top_p", "0"], "top_p=0.0 must be in"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("sample.py: error: ") and len(err.splitlines()) == 1, err
        assert re.search(match, err), (match, err)
    # Without --max_new_tokens, generation fills what the block leaves after the longest prompt.
    assert main(["--run", path, "--prompt_tokens", "1,2", "--prompt_tokens=" + _ids(range(3, 43)),
                 "--print_tokens", "--temperature", "1.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines[1].split(" | ")[1].split(",")) == cfg.block_size - 40
    # --template instruct follows the template the run was trained with.
    custom = save_params(str(tmp_path / "custom"), cfg, tiny_params(cfg),
                         meta={"tokenizer": "bytes", "template": "Q: {question}\nA: {answer}"})
    assert main(["--run", custom, "--prompt", "Hi", "--template", "instruct", "--max_new_tokens",
                 "10", "--print_tokens"]) == 0
    assert capsys.readouterr().out.startswith(_ids([257, *b"Q: Hi\nA: "]) + " | ")
    odd = save_params(str(tmp_path / "odd"), cfg, tiny_params(cfg),
                      meta={"tokenizer": "bytes", "template": "{text}"})
    assert main(["--run", odd, "--prompt", "Hi", "--template", "instruct"]) == 2
    assert "use --template none and write the whole prompt" in capsys.readouterr().err
    # A converted dir without a tokenizer still samples from token ids (printed as ids).
    assert main(["--run", no_tok, "--prompt_tokens", "1,2", "--max_new_tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("1,2 | ")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("one\n\ntwo\nthree\nfour\n", encoding="utf-8")
    assert main(["--run", path, "--prompt_file", str(prompt_file), "--max_new_tokens", "10",
                 "--print_tokens"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [_ids(w.encode()) for w in
                                                        ("one", "two", "three", "four")]


def test_sample_py_stop_ids_and_texts(params_dir, sample_main, capsys):
    path, cfg = params_dir
    main, params = sample_main, tiny_params(cfg)
    free = generate(cfg, params, [list(b"hello")], max_new_tokens=10, eos_id=258)[0]
    stop = free[3]
    want = generate(cfg, params, [list(b"hello")], max_new_tokens=10, eos_id=258, stop_ids=[stop])[0]
    assert want == free[:free.index(stop)]
    assert main(["--run", path, "--prompt_tokens", _ids(b"hello"), "--max_new_tokens", "10",
                 "--print_tokens", "--stop", str(stop)]) == 0
    assert capsys.readouterr().out == f"{_ids(b'hello')} | {_ids(want)}\n"
    # A text of one token is a stop id; a longer text cuts the decoded completion.
    from reflex_jax.cli.sample import _stops, parse_args
    from reflex_jax.errors import UsageError
    from reflex_jax.data import load_tokenizer
    stops = _stops(parse_args(["--run", path, "--stop", "a", "--stop", "\\n", "--stop", "ab",
                               "--stop", "7"]), load_tokenizer("bytes"))
    assert stops == ([97, 10, 7], ["ab"])
    text = bytes(t for t in free if t < 256).decode("utf-8", errors="replace")
    two = text[2:4]
    assert main(["--run", path, "--prompt", "hello", "--max_new_tokens", "10", "--stop", two]) == 0
    assert capsys.readouterr().out == "hello" + text[:text.index(two)] + "\n"
    assert main(["--run", path, "--prompt", "hello", "--stop", ""]) == 2
    assert "--stop '' is empty" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--stop 'ab' is text, which needs a tokenizer"):
        _stops(parse_args(["--run", path, "--stop", "ab"]), None)


# ---- issue #32: non-finite flags and text that is not UTF-8 ------------------------------------

def test_non_finite_sampling_settings_are_refused(params_dir, sample_main, capsys):
    path, cfg = params_dir
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top_p", "nan")):
        assert sample_main(["--run", path, "--prompt", "x", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"sample.py: error: {flag} {float(value)} is not a finite number; pass " + (
            "0 for greedy or a positive temperature such as 0.8." if flag == "--temperature"
            else "a number in (0, 1], 1 for no nucleus filtering."), err
    # The library refuses it too: nan passed `temperature < 0` and sampled token 0 forever.
    with pytest.raises(GenerationError, match="temperature=nan must be a finite number"):
        generate(cfg, tiny_params(cfg), [[1, 2]], max_new_tokens=2, temperature=float("nan"))


def test_text_that_is_not_utf8_is_one_sentence_with_its_offset(params_dir, tmp_path):
    """Real argv bytes (Linux hands undecodable bytes to Python as surrogate escapes) and a real
    prompt file, through the sample.py script: one line naming the flag or file and the byte."""
    path, _ = params_dir
    bad_file = tmp_path / "prompts.txt"
    bad_file.write_bytes("первый\nвто".encode() + b"\xd0\n")  # a cut Cyrillic letter on line 2
    script = os.path.join(ROOT, "sample.py").encode()
    cases = [
        ([b"--prompt", b"caf\xe9 au lait"], "--prompt is not valid UTF-8 at byte 3, byte 0xe9"),
        ([b"--prompt", b"ok", b"--prompt", b"\xff"], "--prompt #2 is not valid UTF-8 at byte 0"),
        ([b"--prompt_file", str(bad_file).encode()],
         f"--prompt_file {str(bad_file)!r} is not valid UTF-8 at byte 19 (line 2), byte 0xd0"),
        ([b"--prompt", b"x", b"--stop", b"\xfe"], "--stop '\\udcfe' is not valid UTF-8 at byte 0"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, script, b"--run", path.encode(), *argv,
                               b"--max_new_tokens", b"2"], capture_output=True, timeout=300,
                              cwd=ROOT, env={**os.environ, "REFLEX_TUNE_MALLOC": "0"})
        err = proc.stderr.decode("utf-8", "replace").strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("sample.py: error: " + message), (message, err)


def test_decode_user_text():
    from reflex_jax.errors import DataError, UsageError
    from reflex_jax.text import decode_user_text
    assert decode_user_text("Привет", "--prompt") == "Привет"
    assert decode_user_text(b"\xef\xbb\xbfone\ntwo", "f") == "one\ntwo"  # a BOM is not text
    with pytest.raises(DataError, match=r"^f is not valid UTF-8 at byte 5 \(line 2\), byte 0xff;"):
        decode_user_text(b"\xef\xbb\xbfa\n\xff", "f", DataError)
    with pytest.raises(UsageError, match="holds the lone surrogate U\\+D800 at byte 2"):
        decode_user_text("ab\ud800", "x")
