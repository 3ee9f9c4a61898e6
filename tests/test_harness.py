"""lm-evaluation-harness on a params directory through the HF export: evaluate_run(backend="hf")
(export + lm-eval's `hf` model) and `reflex-eval --backend hf` score a local multiple-choice task
with exactly the accuracies that the JAX model's own log-likelihoods of the choices give; user
mistakes are one sentence. The JAX backend against this one: tests/test_lm_eval_jax.py."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from reflex_jax.checkpoint import save_params  # noqa: E402
from reflex_jax.cli import harness as harness_cli  # noqa: E402
from reflex_jax.errors import UsageError  # noqa: E402
from reflex_jax.harness import evaluate_run  # noqa: E402
from reflex_jax.model import Decoder, ModelConfig, abstract_params  # noqa: E402

TASK = "reflex_tiny_choice"
WORDS = ("кот пёс дом лес река гора поле небо море снег дождь ветер луна звезда солнце утро "
         "вечер ночь день хлеб вода молоко сыр чай сад мост город дорога окно дверь").split()
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def make_tokenizer(directory: str):
    """A word-level tokenizer with bos/eos/pad, saved as transformers files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def make_docs(n=24, seed=2):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS, 4))
        choices = []
        while len(choices) < 4:  # distinct phrases of 1-3 words, so lengths differ
            phrase = " ".join(rng.choice(WORDS, rng.integers(1, 4)))
            if phrase not in choices:
                choices.append(phrase)
        docs.append({"context": context, "choices": choices, "label": int(rng.integers(4))})
    return docs


def random_params(cfg):
    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    rng = np.random.default_rng(3)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape)
        if name.endswith("['scale']"):
            noise = 1.0 + 0.3 * noise
        elif name.endswith("['bias']"):
            noise = 0.3 * noise
        elif name not in ("['wte']", "['wpe']", "['lm_head']"):
            noise = noise / np.sqrt(leaf.shape[0] * (leaf.shape[1] if "['o']" in name else 1))
        out.append(noise.astype(np.float32))
    return jax.tree_util.tree_unflatten(tree, out)


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer(str(root / "tokenizer"))
    cfg = ModelConfig(vocab_size=len(tok), block_size=32, n_layer=2, n_head=4, n_embd=32,
                      mlp_hidden=64, head_plan="all", pos_emb="rope")
    params = random_params(cfg)
    run = save_params(str(root / "params"), cfg, params,
                      meta={"tokenizer": str(root / "tokenizer")})
    docs = make_docs()
    (root / "tasks").mkdir()
    with open(root / "tasks" / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    (root / "tasks" / "task.yaml").write_text(
        TASK_YAML.format(task=TASK, data=root / "tasks" / "docs.jsonl"), encoding="utf-8")
    return dict(root=root, tok=tok, cfg=cfg, params=params, run=run, docs=docs,
                tasks=str(root / "tasks"))


@pytest.fixture(scope="module")
def expected(setup):
    return jax_accuracies(setup)


def jax_accuracies(setup):
    """(acc, acc_norm) from the JAX model: the summed log-probability of each choice's tokens
    after the context (lm-eval's scoring), normalised by the choice's characters for acc_norm."""
    tok, cfg, docs = setup["tok"], setup["cfg"], setup["docs"]
    rows = []  # (doc, choice, tokens, context length)
    for d, doc in enumerate(docs):
        ctx = tok.encode(doc["context"], add_special_tokens=False)
        for c, choice in enumerate(doc["choices"]):
            rows.append((d, c, tok.encode(doc["context"] + " " + choice, add_special_tokens=False),
                         len(ctx)))
    batch = np.zeros((len(rows), cfg.block_size), np.int32)  # right padding: causal, harmless
    for r, (_, _, ids, _) in enumerate(rows):
        batch[r, :len(ids)] = ids
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(Decoder(cfg).apply({"params": p}, t)),
                      compiler_options={"xla_backend_optimization_level": 0})
    logp = np.asarray(forward(setup["params"], jnp.asarray(batch)))
    ll = np.zeros((len(docs), 4))
    for r, (d, c, ids, n_ctx) in enumerate(rows):
        ll[d, c] = sum(logp[r, t - 1, ids[t]] for t in range(n_ctx, len(ids)))
    labels = np.array([doc["label"] for doc in docs])
    lengths = np.array([[len(ch) for ch in doc["choices"]] for doc in docs], float)
    return (float(np.mean(ll.argmax(1) == labels)),
            float(np.mean((ll / lengths).argmax(1) == labels)))


def test_evaluate_run_scores_what_the_jax_model_scores(setup, expected, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    acc, acc_norm = expected
    assert 0.0 < acc < 1.0 and acc != acc_norm  # both numbers carry information
    export = str(setup["root"] / "hf")
    metrics = evaluate_run(setup["run"], [TASK], backend="hf", out_dir=export, batch_size=4,
                           include_path=setup["tasks"], include_defaults=False)
    assert metrics[TASK]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert metrics[TASK]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    config = json.load(open(os.path.join(export, "config.json")))
    tok = setup["tok"]
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert os.path.isfile(os.path.join(export, "tokenizer.json"))


def test_cli_main_prints_and_writes_the_same_metrics(setup, expected, monkeypatch, tmp_path,
                                                     capsys):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    # Indexing lm-eval's ~14,700 built-in tasks takes seconds; this run needs only its own task.
    import lm_eval.tasks
    full_index = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda **kw: full_index(**{**kw, "include_defaults": False}))
    acc, acc_norm = expected
    out = tmp_path / "results.json"
    status = harness_cli.main(["--run", setup["run"], "--tasks", TASK, "--include_path",
                               setup["tasks"], "--batch_size", "2", "--backend", "hf",
                               "--device", "cpu", "--out", str(out)])
    assert status == 0
    written = json.loads(out.read_text())[TASK]
    assert (written["acc,none"], written["acc_norm,none"]) == pytest.approx((acc, acc_norm),
                                                                            abs=1e-9)
    assert f"{TASK} acc,none {acc:.4f}" in capsys.readouterr().out.splitlines()


def test_cli_errors_are_one_sentence(setup, tmp_path, capsys):
    bare = save_params(str(tmp_path / "bare"), setup["cfg"], setup["params"])  # no tokenizer
    assert harness_cli.main(["--run", bare, "--tasks", TASK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reflex-eval: error: ") and "names no tokenizer in meta.json" in err
    assert "\n" not in err
    assert harness_cli.main(["--run", setup["run"], "--tasks", TASK, "--limit", "0"]) == 2
    assert "--limit 0 must be positive" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"lm-eval knows no task 'no_such_task'"):
        evaluate_run(setup["run"], ["no_such_task"], include_path=setup["tasks"],
                     include_defaults=False)


def test_missing_lm_eval_says_how_to_install(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an import sees when it is absent
    with pytest.raises(UsageError, match=r"lm-eval is not installed; install it with "
                                         r"pip install -e '\.\[eval\]'\."):
        evaluate_run(setup["run"], [TASK])
