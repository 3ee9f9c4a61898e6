"""lm-eval on the JAX decoder (reflex_jax/lm_eval_model.py) against lm-eval's `hf` model on the HF
export of the same params: the same log-likelihoods (context truncated on the left included),
rolling log-likelihoods and greedy generations, hence the same task metrics; a few compiles for
many lengths; task metrics in metrics.jsonl during training, the same on two processes as on
one; user mistakes in one sentence. Offline: local task YAMLs over JSON lines files."""
import json

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from reflex_jax.checkpoint import save_params  # noqa: E402
from reflex_jax.cli import harness as harness_cli  # noqa: E402
from reflex_jax.errors import TrainingError, UsageError  # noqa: E402
from reflex_jax.harness import evaluate_run  # noqa: E402
from reflex_jax.lm_eval_model import ReflexLM  # noqa: E402
from reflex_jax.model import ModelConfig  # noqa: E402
from reflex_jax.train.trainer import Trainer  # noqa: E402
from test_harness import (OFFLINE, TASK, TASK_YAML, WORDS, make_docs, make_tokenizer,  # noqa: E402
                          random_params)
from test_trainer import read_metrics, small_config  # noqa: E402

ROLLING, GEN = "reflex_tiny_rolling", "reflex_tiny_gen"
ROLLING_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["{stop}"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def words(rng, n):
    return " ".join(rng.choice(WORDS, n))


def write_task(directory, name, yaml, rows, **fmt):
    data = directory / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (directory / f"{name}.yaml").write_text(yaml.format(task=name, data=data, **fmt),
                                            encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 2-layer model on a word-level tokenizer, block 32, and three local tasks: multiple
    choice (some contexts longer than the block), rolling (texts of up to three windows) and
    generation (stopping at a word)."""
    root = tmp_path_factory.mktemp("lmj")
    tok = make_tokenizer(str(root / "tokenizer"))
    cfg = ModelConfig(vocab_size=len(tok), block_size=32, n_layer=2, n_head=4, n_embd=32,
                      mlp_hidden=64, head_plan="all", pos_emb="rope")
    params = random_params(cfg)
    run = save_params(str(root / "params"), cfg, params,
                      meta={"tokenizer": str(root / "tokenizer")})
    rng = np.random.default_rng(5)
    docs = make_docs()
    for d in docs[:3]:  # 30-40 words: context + choice past the block, truncated on the left
        d["context"] = words(rng, int(rng.integers(30, 41)))
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, TASK, TASK_YAML, docs)
    write_task(tasks, ROLLING, ROLLING_YAML,
               [{"text": words(rng, n)} for n in (3, 12, 31, 33, 50, 90)])
    write_task(tasks, GEN, GEN_YAML, [{"context": words(rng, int(rng.integers(2, 30))),
                                       "answer": words(rng, 2)} for _ in range(12)], stop="дом")
    export = str(root / "hf")
    from reflex_jax.interop.export import export_run
    export_run("hf", run, export)
    return dict(root=root, tok=tok, cfg=cfg, params=params, run=run, docs=docs, rng=rng,
                tasks=str(tasks), export=export)


@pytest.fixture(scope="module")
def models(setup):
    pytest.importorskip("torch")
    from lm_eval.models.huggingface import HFLM
    hf = HFLM(pretrained=setup["export"], trust_remote_code=True, dtype="float32", device="cpu",
              batch_size=4)
    jx = ReflexLM(run=setup["run"], batch_size=4,
                  compiler_options={"xla_backend_optimization_level": 0})
    return hf, jx


def no_index(monkeypatch):
    """A task not in the local YAMLs makes lm-eval index its own ~14,700 tasks (seconds); these
    tests need only their own."""
    import lm_eval.tasks
    full_index = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda **kw: full_index(**{**kw, "include_defaults": False}))


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_the_hf_exports(setup, models):
    hf, jx = models
    pairs = [(d["context"], " " + c) for d in setup["docs"] for c in d["choices"]]
    pairs += [("", "кот пёс дом"), ("река ", "гора")]  # empty context: after the prefix token
    assert max(len(jx.tok_encode(c + x)) for c, x in pairs) > jx.max_length + 1  # truncated
    want = hf.loglikelihood(requests("loglikelihood", pairs))
    got = jx.loglikelihood(requests("loglikelihood", pairs))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    # lengths 3..33 tokens in batches of 4: a few (rows, length) buckets, not one per length
    lengths = {len(jx.tok_encode(c + x)) for c, x in pairs}
    assert len(lengths) > 10 and len(set(jx.scorer.compiled_shapes)) <= 4


def test_rolling_and_generation_equal_the_hf_exports(setup, models):
    hf, jx = models
    rng = np.random.default_rng(9)
    texts = [(words(rng, n),) for n in (1, 5, 31, 32, 33, 64, 100)]
    want = hf.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    got = jx.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    gens = [(words(rng, n), {"until": ["дом"], "max_gen_toks": 7, "do_sample": False})
            for n in (1, 3, 8, 20, 40)]
    gens += [(words(rng, 4), {"until": ["лес", "кот пёс"], "max_gen_toks": 5})]
    want = hf.generate_until(requests("generate_until", gens))
    got = jx.generate_until(requests("generate_until", gens))
    assert got == want and any(got) and len(set(got)) > 1


@pytest.mark.slow
def test_task_metrics_equal_the_hf_backends(setup, monkeypatch):
    pytest.importorskip("torch")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tasks = [TASK, ROLLING, GEN]
    jx = evaluate_run(setup["run"], tasks, include_path=setup["tasks"], batch_size=4)
    hf = evaluate_run(setup["run"], tasks, backend="hf", include_path=setup["tasks"],
                      batch_size=4, include_defaults=False)
    assert set(jx) == set(hf) == set(tasks)
    for task in tasks:
        assert set(jx[task]) == set(hf[task])
        for name, value in hf[task].items():
            assert jx[task][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (task, name)
    assert 0 < jx[TASK]["acc,none"] < 1 and jx[ROLLING]["word_perplexity,none"] > 1


def test_cli_defaults_to_jax_and_says_what_belongs_to_hf(setup, capsys, tmp_path, monkeypatch):
    no_index(monkeypatch)
    out = tmp_path / "m.json"
    assert harness_cli.main(["--run", setup["run"], "--tasks", TASK, "--include_path",
                             setup["tasks"], "--batch_size", "4", "--out", str(out)]) == 0
    acc = json.loads(out.read_text())[TASK]["acc,none"]
    assert f"{TASK} acc,none {acc:.4f}" in capsys.readouterr().out.splitlines()
    for argv, msg in ((["--device", "cpu"], "--device is for --backend hf"),
                      (["--backend", "torch"], "backend 'torch' is unknown"),
                      (["--tasks", "no_such_task"], "lm-eval knows no task 'no_such_task'")):
        args = ["--run", setup["run"], "--tasks", TASK, "--include_path", setup["tasks"]]
        if argv[0] == "--tasks":
            args[3] = argv[1]
            argv = []
        assert harness_cli.main(args + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("reflex-eval: error: ") and msg in err and "\n" not in err


def test_lm_eval_builds_the_registered_model(setup):
    from lm_eval.api.registry import get_model
    lm = get_model("reflex_jax").create_from_arg_string(
        f"run={setup['run']},batch_size=2", {"batch_size": None, "device": "cpu"})
    assert isinstance(lm, ReflexLM) and lm.batch_size == 2 and lm.max_length == 32
    with pytest.raises(UsageError, match=r"takes no argument 'pretrained'"):
        get_model("reflex_jax").create_from_arg_string(f"run={setup['run']},pretrained=x")


def test_add_bos_token_starts_every_context_with_bos(setup):
    lm = ReflexLM(run=setup["run"], add_bos_token=True, batch_size=2)
    bos = setup["tok"].bos_token_id
    assert lm.tok_encode("кот пёс") == [bos] + setup["tok"].encode("кот пёс")
    ctx, cont = lm._encode_pair("кот", " пёс")
    assert ctx[0] == bos and cont == setup["tok"].encode("пёс")


# ---- inside training ----------------------------------------------------------------------------

def arith_tasks(directory):
    """A byte-tokenizer multiple-choice task (sums) and a rolling one, for the arith runs."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        wrong = [a + b + 1, a + b + 2, abs(a - b) + 20]
        label = int(rng.integers(4))
        choices = [str(w) for w in wrong]
        choices.insert(label, str(a + b))
        rows.append({"context": f"{a} плюс {b} =", "choices": choices, "label": label})
    directory.mkdir(exist_ok=True)
    write_task(directory, "arith_choice", TASK_YAML, rows)
    write_task(directory, "arith_text", ROLLING_YAML,
               [{"text": f"{a} плюс {b} = {a + b}"} for a, b in rng.integers(0, 20, (6, 2))])
    return str(directory)


@pytest.mark.slow
def test_a_run_logs_task_metrics_at_the_interval(tmp_path, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    paths = arith_tasks(tmp_path / "tasks")
    c = small_config(tmp_path / "run", max_steps=5, eval_tasks="arith_choice,arith_text",
                     eval_tasks_interval=2, eval_task_paths=paths, log_interval=0)
    Trainer(c, log=lambda s: None).train()
    rows = read_metrics(c.run_dir)
    scored = [r for r in rows if "task/arith_choice/acc" in r]
    assert [r["step"] for r in scored] == [2, 4, 5]  # every 2 steps and the last
    assert {"task/arith_choice/acc_norm", "task/arith_text/word_perplexity"} <= set(scored[-1])
    # the live params' numbers are the saved step's, scored from the run directory
    again = evaluate_run(c.run_dir, ["arith_choice", "arith_text"], include_path=paths,
                         step=5, include_defaults=False)
    assert scored[-1]["task/arith_choice/acc"] == again["arith_choice"]["acc,none"]
    assert scored[-1]["task/arith_text/word_perplexity"] == pytest.approx(
        again["arith_text"]["word_perplexity,none"], rel=1e-5)


def test_task_config_mistakes_are_one_sentence(tmp_path, monkeypatch):
    no_index(monkeypatch)
    paths = arith_tasks(tmp_path / "tasks")
    cases = [(dict(eval_tasks="no_such_task", eval_tasks_interval=2, eval_task_paths=paths),
              r"eval_tasks names 'no_such_task', a task lm-eval does not know; .*eval_task_paths"),
             (dict(eval_tasks="arith_choice", eval_tasks_interval=-1),
              r"eval_tasks_interval=-1 must be an integer >= 0"),
             (dict(eval_tasks="arith_choice", eval_tasks_interval=0, eval_task_paths=paths),
              r"eval_tasks_interval=0 never scores them; set --config.eval_tasks_interval"),
             (dict(eval_tasks="arith_choice", eval_tasks_interval=2,
                   eval_task_paths=str(tmp_path / "nowhere")),
              r"eval_task_paths names .*nowhere', which is not a directory")]
    for i, (kw, msg) in enumerate(cases):
        with pytest.raises(TrainingError, match=msg) as e:
            Trainer(small_config(tmp_path / f"r{i}", **kw), log=lambda s: None)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_processes_log_the_task_metrics_of_one(tmp_path):
    """train.py on 8 devices in one process and on 2 processes x 4 devices (loopback, gloo) with a
    data x fsdp x tensor = 2 x 2 x 2 mesh: the same task metrics at the same steps."""
    from test_sharding import _cli, _free_port, _read_metrics, _train, _wait
    paths = arith_tasks(tmp_path / "tasks")
    kw = {"max_steps": 4, "eval_interval": 0, "eval_exact_match": 0, "eval_tasks_interval": 2,
          "eval_tasks": "arith_choice,arith_text", "eval_task_paths": paths,
          "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.block_size": 32}
    env = dict(OFFLINE)
    single = _train(_cli(tmp_path / "one", **kw), 8, tmp_path / "one.log", **env)
    port = _free_port()
    procs = [_train(_cli(tmp_path / "two", **kw) + [f"--coordinator=127.0.0.1:{port}",
                                                     "--num_processes=2", f"--process_id={i}"],
                    4, tmp_path / f"two{i}.log", **env) for i in range(2)]
    for i, p in enumerate(procs):
        _wait(p, tmp_path / f"two{i}.log")
    _wait(single, tmp_path / "one.log")

    def tasks(run):
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("task/")}
                for r in _read_metrics(run) if any(k.startswith("task/") for k in r)}

    one, two = tasks(tmp_path / "one"), tasks(tmp_path / "two")
    assert sorted(one) == sorted(two) == [2, 4]
    for step in one:
        assert set(one[step]) == set(two[step])
        for name, value in one[step].items():
            assert two[step][name] == pytest.approx(value, rel=1e-5), (step, name)
