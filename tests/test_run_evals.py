"""reflex_jax.evals: every evaluation scored through the one Scorer on hand-checkable models
(uniform logits; a copy oracle with a memory span; Python oracles that answer recall and passkey
rows from the last m pairs or tokens), and the real decoder of a tiny random params directory
through the CLI; user mistakes are one sentence."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax.checkpoint import save_params
from reflex_jax.cli import evals as evals_cli
from reflex_jax.data import ByteTokenizer, load_tokenizer
from reflex_jax.data.tasks import _NOUNS
from reflex_jax.errors import ConfigError, DataError, MissingFileError, UsageError
from reflex_jax.evals import Scorer, decoder_apply, evaluate_model, parse_evals, suite
from reflex_jax.model import ModelConfig, abstract_params

V = 259  # the byte tokenizer's vocabulary
TOK = ByteTokenizer()
TEXT_A = "Мой дядя самых честных правил, когда не в шутку занемог. " * 5
TEXT_B = "Он уважать себя заставил и лучше выдумать не мог.\n" * 4
ASCII = "".join(chr(c) for c in range(32, 127))  # 95 distinct one-byte tokens


def uniform(params, tokens_BT):
    return jnp.zeros(tokens_BT.shape + (V,), jnp.float32)


def scorer(apply_fn, block_size, **kw):
    return Scorer(apply_fn, None, block_size=block_size, vocab_size=V, pad_id=TOK.pad_id, **kw)


def write(tmp_path, files: dict):
    d = tmp_path / "text"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return str(d)


def test_uniform_model_has_log2_vocab_bits_per_byte_at_every_position(tmp_path):
    text = write(tmp_path, {"a.txt": TEXT_A, "b.txt": TEXT_B})
    out = evaluate_model(scorer(uniform, 16), TOK, 16, ["bpb", "position"], text=[text],
                         buckets=4, log=None)
    n_bytes = [len(t.encode("utf-8")) for t in (TEXT_A, TEXT_B)]
    b = out["bpb"]
    assert b["bytes"] == b["tokens"] == sum(n_bytes)          # every byte a target, once
    assert b["windows"] == sum(-(-n // 16) for n in n_bytes)  # non-overlapping windows
    assert b["documents"] == 2
    assert b["bpb"] == pytest.approx(math.log2(V), rel=1e-6)
    assert b["loss"] == pytest.approx(math.log(V), rel=1e-6)
    curve = out["position"]["buckets"]
    assert [(c["start"], c["stop"]) for c in curve] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert [c["bpb"] for c in curve] == pytest.approx([math.log2(V)] * 4, rel=1e-6)
    assert sum(c["tokens"] for c in curve) == b["tokens"]


def test_uniform_model_with_bpe_is_log2_vocab_over_bytes_per_token(tmp_path):
    from byte_bpe import train_byte_bpe
    tok = load_tokenizer(train_byte_bpe([TEXT_A, TEXT_B], 300, str(tmp_path / "bpe")))
    text = write(tmp_path, {"a.txt": TEXT_A, "b.txt": TEXT_B})
    vocab = tok.vocab_size
    s = Scorer(lambda p, t: jnp.zeros(t.shape + (vocab,)), None, block_size=8, vocab_size=vocab)
    b = evaluate_model(s, tok, 8, ["bpb"], text=[text], log=None)["bpb"]
    tokens = sum(len(tok.encode(t)) for t in (TEXT_A, TEXT_B))
    n_bytes = sum(len(t.encode("utf-8")) for t in (TEXT_A, TEXT_B))
    assert (b["tokens"], b["bytes"]) == (tokens, n_bytes) and tokens < n_bytes / 2
    assert b["bpb"] == pytest.approx(math.log2(vocab) * tokens / n_bytes, rel=1e-6)


def late_copier(k):
    """Uniform before position k; from k on, certain that the next token repeats this one."""
    def apply(params, tokens_BT):
        T = tokens_BT.shape[1]
        hot = jax.nn.one_hot(tokens_BT, V) * 1e4
        return jnp.where((jnp.arange(T) >= k)[None, :, None], hot, 0.0)
    return apply


def test_position_curve_counts_each_position_of_the_window(tmp_path):
    # 3 full windows of "a": the copier is exact from position 4, knows nothing before it
    text = write(tmp_path, {"a.txt": "a" * 48})
    out = evaluate_model(scorer(late_copier(4), 16), TOK, 16, ["bpb", "position"], text=[text],
                         buckets=4, log=None)
    assert out["bpb"]["windows"] == 3
    assert out["bpb"]["bpb"] == pytest.approx(math.log2(V) / 4, rel=1e-6)
    assert [c["bpb"] for c in out["position"]["buckets"]] == pytest.approx(
        [math.log2(V), 0, 0, 0], abs=1e-6)


def span_copier(span):
    """Induction with a memory of `span` tokens: finds the latest earlier occurrence of the
    current token at most `span` back and is certain the next token is the one that followed it;
    uniform when there is none."""
    def apply(params, tokens_BT):
        T = tokens_BT.shape[1]
        t, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        seen = (tokens_BT[:, :, None] == tokens_BT[:, None, :]) & (j < t) & (t - j <= span)
        last = jnp.max(jnp.where(seen, j, -1), axis=-1)
        nxt = jnp.take_along_axis(tokens_BT, jnp.clip(last + 1, 0, T - 1), axis=1)
        return jnp.where((last >= 0)[..., None], jax.nn.one_hot(nxt, V) * 1e4, 0.0)
    return apply


def test_forgetting_curve_drops_where_the_first_copy_is_in_memory(tmp_path):
    text = write(tmp_path, {"cycle.txt": ASCII * 4})  # every 95-token span is distinct
    P, span = 8, 40
    out = evaluate_model(scorer(span_copier(span), 64), TOK, 64, ["forgetting"], text=[text],
                         passage=P, distances=[0, 16, 32, 33, 48], samples=5, log=None)
    f = out["forgetting"]
    assert (f["passage"], f["samples"]) == (P, 5)
    ln_v = math.log(V)
    for row in f["distances"]:
        remembered = P + row["distance"] <= span  # the copy-1 token lies within the span
        assert row["copy1_loss"] == pytest.approx(ln_v, rel=1e-6)
        assert row["copy1_accuracy"] == 0
        # copy 2's first token cannot be known; the other P - 1 are copied when remembered
        assert row["copy2_loss"] == pytest.approx(ln_v / P if remembered else ln_v, rel=1e-6)
        assert row["copy2_accuracy"] == pytest.approx((P - 1) / P if remembered else 0)
        assert row["drop"] == pytest.approx(row["copy1_loss"] - row["copy2_loss"])
        assert row["drop_se"] == pytest.approx(0, abs=1e-6)  # the same drop for every passage
        # without the first copy nothing in the window repeats: copy 2's place costs ln V a token
        assert row["control_loss"] == pytest.approx(ln_v, rel=1e-6)
        assert row["remembered"] == pytest.approx(ln_v - row["copy2_loss"], abs=1e-5)
    assert [r["distance"] for r in f["distances"]] == [0, 16, 32, 33, 48]


def python_model(fn):
    """A plain numpy function of the token rows as `apply_fn` (through jax.pure_callback)."""
    def apply(params, tokens_BT):
        shape = jax.ShapeDtypeStruct(tokens_BT.shape + (V,), jnp.float32)
        return jax.pure_callback(lambda t: fn(np.asarray(t)).astype(np.float32), shape, tokens_BT)
    return apply


GENITIVE = {gen: nom for nom, gen in _NOUNS}


def prefix_oracle(target):
    """A model that puts all its mass on target(prefix text) after each prefix of a row (the
    prefix decoded from bytes after bos), and is uniform where target gives None."""
    def fn(tokens):
        out = np.zeros(tokens.shape + (V,), np.float32)
        for b, row in enumerate(tokens):
            for t in range(len(row)):
                prefix = bytes(int(i) for i in row[1:t + 1] if i < 256).decode("utf-8", "ignore")
                token = target(prefix)
                if token is not None:
                    out[b, t, token] = 1e4
        return out
    return fn


def recall_oracle(memory):
    """Answers a kv_recall question (then eos) when the asked pair is among the last `memory`
    pairs said; uniform otherwise."""
    def target(prefix):
        m = re.search(r"Запомни: (.*)\. Сколько у (\w+)\?\n### Ответ: (\d?)$", prefix)
        if not m:
            return None
        pairs = [p.split(" — ") for p in m.group(1).split(", ")]
        k = [nom for nom, _ in pairs].index(GENITIVE[m.group(2)])
        if len(pairs) - k > memory:
            return None
        return TOK.eos_id if m.group(3) else TOK.encode(pairs[k][1])[0]
    return prefix_oracle(target)


def test_recall_scores_every_answer_by_pairs_and_distance():
    out = evaluate_model(scorer(python_model(recall_oracle(2)), 160), TOK, 160, ["recall"],
                         pairs=[1, 3], samples=4, log=None)["recall"]
    ln_v = math.log(V)
    one, three = out["pairs"]
    assert (one["n_pairs"], one["answers"], one["exact_match"]) == (1, 4, 1.0)
    assert (three["n_pairs"], three["answers"]) == (3, 12)
    assert [d["exact_match"] for d in three["by_distance"]] == [1.0, 1.0, 0.0]
    assert [d["answers"] for d in three["by_distance"]] == [4, 4, 4]
    assert [d["answer_loss"] for d in three["by_distance"]] == pytest.approx([0, 0, ln_v],
                                                                           abs=1e-6)
    assert three["exact_match"] == pytest.approx(2 / 3)


def test_recall_asks_every_pair_of_a_context_in_the_task_format():
    for context in suite.recall_contexts(4, 3, seed=0, max_value=9):
        said = {r["question"].split(". Сколько")[0] for r in context}
        assert len(said) == 1 and said.pop().startswith("Запомни: ")
        assert [r["distance"] for r in context] == [1, 2, 3, 4]
        pairs = dict(p.split(" — ") for p in
                     context[0]["question"][len("Запомни: "):].split(". Сколько")[0].split(", "))
        for r in context:
            asked = GENITIVE[r["question"].rsplit(" ", 1)[1].rstrip("?")]
            assert r["answer"] == pairs[asked]
            assert list(pairs)[len(pairs) - r["distance"]] == asked


def multi_recall_oracle(memory):
    """Answers each query of a multi-query kv_recall row (and the eos after the last) when its
    pair is among the last `memory` pairs said; uniform otherwise."""
    def target(prefix):
        m = re.search(r"Запомни: (.*?)\. Сколько у (\w+)\?\n### Ответ: (.*)$", prefix)
        if not m:
            return None
        pairs = [p.split(" — ") for p in m.group(1).split(", ")]
        asked = [m.group(2)] + re.findall(r"Сколько у (\w+)\? ", m.group(3))
        k = [nom for nom, _ in pairs].index(GENITIVE[asked[-1]])
        if len(pairs) - k > memory:
            return None
        if m.group(3) and m.group(3)[-1].isdigit():  # its value was just given
            return TOK.eos_id if len(asked) == len(pairs) else None
        if not m.group(3) or m.group(3).endswith("? "):
            return TOK.encode(pairs[k][1])[0]
        return None
    return prefix_oracle(target)


def test_multi_query_recall_scores_each_answer_of_a_row_by_distance():
    out = evaluate_model(scorer(python_model(multi_recall_oracle(2)), 200), TOK, 200, ["recall"],
                         pairs=[1, 3], samples=6, recall_format="multi", log=None)["recall"]
    one, three = out["pairs"]
    assert out["format"] == "multi" and (one["answers"], one["exact_match"]) == (6, 1.0)
    assert (three["n_pairs"], three["answers"]) == (3, 18)
    assert [d["exact_match"] for d in three["by_distance"]] == [1.0, 1.0, 0.0]
    assert [d["answers"] for d in three["by_distance"]] == [6, 6, 6]
    assert [d["answer_loss"] for d in three["by_distance"]] == pytest.approx([0, 0, math.log(V)],
                                                                           abs=1e-6)
    # rows of one pair a question are not what this oracle answers after its first value
    with pytest.raises(ConfigError, match="recall_format"):
        evaluate_model(scorer(uniform, 200), TOK, 200, ["recall"], pairs=[2], samples=2,
                       recall_format="both", log=None)


def test_multi_query_rows_ask_every_pair_once_with_its_value_and_distance():
    for r in suite.multi_query_rows(5, 4, seed=0, max_value=9):
        said = r["question"][len("Запомни: "):].split(". Сколько")[0]
        pairs = dict(p.split(" — ") for p in said.split(", "))
        asked = [r["question"].rsplit(" ", 1)[1].rstrip("?")] + re.findall(r"Сколько у (\w+)\? ",
                                                                            r["answer"])
        assert sorted(GENITIVE[a] for a in asked) == sorted(pairs)
        assert [r["answer"][a:b] for a, b in r["answer_spans"]] == [pairs[GENITIVE[a]] for a in asked]
        assert r["distances"] == [len(pairs) - list(pairs).index(GENITIVE[a]) for a in asked]


def passkey_oracle(memory):
    """Reads the key from the needle when the needle lies in the last `memory` tokens."""
    def fn(tokens):
        out = np.zeros(tokens.shape + (V,), np.float32)
        for b, row in enumerate(tokens):
            for t in range(len(row)):
                text = bytes(int(i) for i in row[1:t + 1] if i < 256).decode("utf-8", "ignore")
                asked = re.search(r"Какой пароль\? Пароль: (\d*)$", text)
                recent = bytes(int(i) for i in row[max(1, t + 1 - memory):t + 1]
                               if i < 256).decode("utf-8", "ignore")
                key = re.search(r"Пароль: (\d+)\.", recent)
                if asked and key and len(asked.group(1)) < len(key.group(1)):
                    out[b, t, ord(key.group(1)[len(asked.group(1))])] = 1e4
        return out
    return fn


def test_passkey_accuracy_by_depth_counts_what_the_model_reaches():
    memory, block = 130, 400
    out = evaluate_model(scorer(python_model(passkey_oracle(memory)), block), TOK, block,
                         ["passkey"], samples=3, log=None)["passkey"]
    depths = out["depths"]
    assert [d["depth"] for d in depths] == [0, 0.25, 0.5, 0.75, 1]
    assert all(d["length"] <= block + 1 for d in depths)
    assert depths[-1]["length"] > block - 60  # the filler fills the window
    for d in depths:
        # the whole "Пароль: KEY." must be within the memory when the first digit is asked
        first_asked = d["length"] - 1 - out["digits"]
        reached = d["needle_position"] >= first_asked - memory + 1
        assert d["accuracy"] == d["token_accuracy"] == (1.0 if reached else 0.0)
        assert d["answer_loss"] == pytest.approx(0 if reached else math.log(V), abs=1e-6)
    accuracy = [d["accuracy"] for d in depths]
    assert accuracy[0] == 0 and accuracy[-1] == 1 and accuracy == sorted(accuracy)


def tiny_params_dir(directory, block=32):
    """A params directory of a random 2-layer `all` decoder (normal weights, drawn in numpy)."""
    cfg = ModelConfig(vocab_size=V, block_size=block, n_layer=2, n_head=4, n_embd=32,
                      head_plan="all")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), abstract_params(cfg))
    return save_params(str(directory), cfg, params, {"tokenizer": "bytes"}), cfg, params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_params_dir(tmp_path_factory.mktemp("evals") / "params")


def test_the_decoder_scores_the_windows_it_is_given(tmp_path, tiny):
    run, cfg, params = tiny
    body = ("Pushkin wrote Onegin in verse. " * 4)[:96]  # bos + 96 bytes: three full windows
    text = write(tmp_path, {"a.txt": body})
    s = Scorer(decoder_apply(cfg), params, block_size=32, vocab_size=V, pad_id=TOK.pad_id,
               batch_size=2)  # three windows in two batches, the second padded
    b = evaluate_model(s, TOK, 32, ["bpb"], text=[text], log=None)["bpb"]
    stream = np.array([TOK.bos_id] + TOK.encode(body))
    windows = np.stack([stream[i:i + 33] for i in (0, 32, 64)])
    from reflex_jax.model import Decoder
    logits = jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(windows[:, :-1]))
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(windows[:, 1:, None]), -1)
    assert (b["windows"], b["tokens"]) == (3, 96)
    assert b["bpb"] == pytest.approx(float(ce.sum()) / (math.log(2) * 96), rel=1e-5)


@pytest.mark.slow
def test_the_cli_runs_every_evaluation_on_a_params_directory(tmp_path, capsys):
    run, _, _ = tiny_params_dir(tmp_path / "params", block=160)
    text = write(tmp_path, {"a.txt": TEXT_A, "b.txt": TEXT_B})
    out = tmp_path / "evals.json"
    assert evals_cli.main(["--run", run, "--text", text, "--samples", "2", "--pairs", "1,2",
                           "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result) >= {"bpb", "position", "forgetting", "recall", "passkey", "model"}
    assert result["tokenizer"] == "bytes" and result["model"]["head_plan"] == "all"
    assert 0 < result["bpb"]["bpb"] < 20
    assert [r["n_pairs"] for r in result["recall"]["pairs"]] == [1, 2]
    assert result["forgetting"]["passage"] == 20
    assert "bpb " in capsys.readouterr().out


def one_line_error(capsys, argv) -> str:
    assert evals_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reflex-evals: error: ") and "\n" not in err
    return err


def test_mistakes_are_one_sentence(tmp_path, capsys, tiny):
    run, cfg, params = tiny
    bare = save_params(str(tmp_path / "bare"), cfg, params)  # meta.json names no tokenizer
    assert "names no tokenizer" in one_line_error(capsys, ["--run", bare, "--evals", "passkey"])
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write(tmp_path, {"a.txt": TEXT_A})
    assert "does not exist" in one_line_error(capsys, ["--run", str(tmp_path / "nope")])
    assert "holds no .txt files" in one_line_error(capsys, ["--run", run, "--text", str(empty),
                                                            "--evals", "bpb"])
    assert "needs --text" in one_line_error(capsys, ["--run", run, "--evals", "forgetting"])
    assert "choose from" in one_line_error(capsys, ["--run", run, "--evals", "ppl"])
    err = one_line_error(capsys, ["--run", run, "--text", text, "--evals", "forgetting",
                                  "--distances", "8,40"])
    assert "distance 40" in err and "0..24" in err
    assert "fewer --pairs" in one_line_error(capsys, ["--run", run, "--evals", "recall",
                                                      "--pairs", "4"])
    assert "--json" in one_line_error(capsys, ["--run", run, "--evals", "passkey", "--json",
                                               str(tmp_path / "no" / "x.json")])


def test_argument_checks_raise_reflex_errors(tmp_path):
    with pytest.raises(UsageError):
        parse_evals("bpb", have_text=False)
    assert parse_evals(None, have_text=False) == ["recall", "passkey"]
    assert parse_evals("passkey,bpb", have_text=True) == ["bpb", "passkey"]
    with pytest.raises(MissingFileError):
        suite.text_files([str(tmp_path / "missing")])
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(DataError):
        suite.text_files([str(tmp_path / "x.md")])
    with pytest.raises(ConfigError):
        suite.passkey(scorer(uniform, 32), TOK, 32, [0.5], 1)  # no room for a passkey row
    with pytest.raises(ConfigError):
        suite.passkey(scorer(uniform, 400), TOK, 400, [1.5], 1)
    assert suite.default_distances(128, 16) == [0, 8, 16, 32, 64, 96]
