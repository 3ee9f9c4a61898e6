"""Every CLI ends a user's mistake the same way (one line `<prog>: error: ...`, exit status 2), and
the console scripts of pyproject.toml point at real entry points."""
import importlib
import os
import tomllib

import pytest

from reflex_jax import errors
from reflex_jax.cli import convert, data, sample, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_console_scripts_resolve_to_callables():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == {"reflex-train", "reflex-sample", "reflex-convert", "reflex-data",
                            "reflex-bench", "reflex-compare", "reflex-eval", "reflex-evals"}
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_every_error_class_is_a_reflex_error():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 10 and all(issubclass(c, errors.ReflexError) for c in classes)
    assert issubclass(errors.MissingFileError, FileNotFoundError)


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err[len(prog) + len(": error: "):]


@pytest.mark.parametrize("args, message", [
    (["--config.model.n_layr=4"], "unknown config field 'model.n_layr'; did you mean 'model.n_layer'?"),
    (["--config.max_steps=abc"], "config field 'max_steps' takes an integer, got 'abc'."),
    (["--config.optim.decay_embeddings=maybe"], "takes true or false, got 'maybe'"),
    (["--max_steps=3"], "unknown argument '--max_steps=3'; config fields are set with --config."),
    (["--config.max_steps"], "--config.max_steps has no value; write --config.max_steps=<value>."),
    (["--config.model=3"], "config field 'model' is a group, not a value"),
])
def test_train_config_mistakes_are_one_sentence(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", TINY] + args)
    assert exit_.value.code == 2
    assert message in _one_line_error(capsys, "train.py")


def test_train_missing_config_file_and_help(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(tmp_path / "nope.py")])
    assert exit_.value.code == 2 and "does not exist" in _one_line_error(capsys, "train.py")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0 and "--dry_run" in capsys.readouterr().out


def test_convert_sample_and_data_mistakes_are_one_sentence(capsys, tmp_path):
    assert convert.main(["--config", TINY, "--hf", str(tmp_path / "none"), "--out",
                         str(tmp_path / "out"), "--config.model.n_hed=2"]) == 2
    assert "did you mean 'model.n_head'" in _one_line_error(capsys, "convert_weights.py")
    assert convert.main(["--config", TINY, "--hf", str(tmp_path / "none"), "--out",
                         str(tmp_path / "out")]) == 2
    assert "--hf" in _one_line_error(capsys, "convert_weights.py")
    out = ["--out", str(tmp_path / "out")]
    for argv, message in [
            (["--hf", str(tmp_path / "no" / "dir")], "is neither an existing directory nor an HF hub"),
            (["--export", "hf"], "--export needs --run, the run or params directory to export."),
            (["--original", "x", "--layers", "0,1"], "--layers applies to --hf imports only"),
            (["--original", "x", "--run", "r"], "--run and --step apply to --export only"),
            (["--export", "hf", "--run", "r", "--config.model.n_head=2"], "drop the --config.*"),
            (["--original", "x", "--config.max_steps=3"], "only --config.model.<field> overrides"),
            (["--export", "hf", "--run", str(tmp_path / "none")], "does not exist")]:
        assert convert.main(argv + out) == 2, argv
        assert message in _one_line_error(capsys, "convert_weights.py"), argv
    assert sample.main(["--run", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "does not exist" in _one_line_error(capsys, "sample.py")
    assert data.main(["info", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in _one_line_error(capsys, "reflex_jax.data")


@pytest.mark.slow
def test_train_runs_an_explicit_schedule_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "explicit"
    train.main(["--config", TINY, "--config.model.head_plan=((),((0,1),),((1,1),(0,1)),((2,2),))",
                "--config.model.n_head=4", "--config.model.n_embd=32", "--config.model.block_size=32",
                f"--config.run_dir={run}", "--config.max_steps=2", "--config.batch_size=4",
                "--config.data.task_rows=64", "--config.data.task_val_rows=8",
                "--config.data.loss_on=all", "--config.eval_interval=0", "--config.eval_exact_match=0",
                "--config.checkpoint_interval=0", "--config.async_checkpoints=false"])
    assert "finished at step 2" in capsys.readouterr().out
    from reflex_jax.checkpoint import load_params
    cfg, params = load_params(str(run))
    assert cfg.head_plan == ((), ((0, 1),), ((1, 1), (0, 1)), ((2, 2),))
    assert [p.n_self for p in cfg.layers] == [4, 3, 2, 2]
    assert params["h_3"]["attn"]["k"]["kernel"].shape == (32, 2, 8)  # only the 2 self heads' K


@pytest.mark.parametrize("name, reflex", [("reflex.py", "all"), ("vanilla.py", "none")])
def test_reference_configs_build_the_original_architecture(name, reflex):
    """configs/reflex.py is the original code's model: pre-RMSNorm with its eps 1e-6, SwiGLU, tied
    embeddings, learned positions, biases."""
    from reflex_jax.run_config import load_config, model_config_from
    m = model_config_from(load_config(os.path.join(ROOT, "configs", name)))
    assert (m.head_plan, m.norm, m.norm_eps, m.mlp, m.tie_embeddings, m.pos_emb, m.bias) == (
        reflex, "rmsnorm", 1e-6, "swiglu", True, "learned", True)
    assert (m.n_layer, m.n_head, m.n_embd, m.vocab_size) == (6, 8, 1536, 50257)


def test_ctrl_c_during_train_startup_is_one_line_and_exit_130(tmp_path):
    """SIGINT while train.py imports JAX (before training starts; once it runs, SIGINT is a stop
    request and exit 75): one line, exit 130, instead of a 158-line KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--config.batch_size=8",
         "--config.max_steps=2", "--config.optim.warmup_steps=1", f"--config.run_dir={tmp_path}/run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "REFLEX_TUNE_MALLOC": "0", "PYTHONUNBUFFERED": "1"})
    try:
        # The first line (the task's data) comes once JAX is up, seconds before the first step.
        # (A SIGINT while jaxlib's extension initialises crashes the process inside jaxlib.)
        assert proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == ("train.py: interrupted by Ctrl-C before training started; nothing was "
                           "trained or saved, so run the command again to start.")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_run_config_papercuts(tmp_path, capsys):
    """keep_checkpoints=-1 was accepted (1 was kept); a prepared data.dir with tiny.py's inherited
    data.task failed with "not made by prepare_task"; warmup past max_steps left no decay, silently."""
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", TINY, "--config.keep_checkpoints=-1"])
    assert exit_.value.code == 2
    assert _one_line_error(capsys, "train.py") == (
        "keep_checkpoints=-1 must be >= 1 (the newest checkpoints kept besides the best); set "
        "--config.keep_checkpoints=1 or more.")
    from reflex_jax.data import prepare
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(50)))
    data_dir = str(tmp_path / "data")
    prepare(str(rows), "bytes", data_dir, progress=False, verbose=False)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", TINY, f"--config.data.dir={data_dir}",
                    f"--config.run_dir={tmp_path}/run"])
    assert exit_.value.code == 2
    assert _one_line_error(capsys, "train.py") == (
        f"data.dir={data_dir!r} was prepared from files, but data.task='arith' is set too (the "
        "config file sets it); add --config.data.task= (empty) to train on that directory, or "
        "drop data.dir to train on the task.")
    from reflex_jax.run_config import load_config
    from reflex_jax.train.checks import check_run_config
    config = load_config(TINY, [("max_steps", "40")])  # tiny.py warms up for 50 steps
    check_run_config(config)
    check_run_config(config)  # the Trainer and the TrainProgram both check: one line
    assert capsys.readouterr().err == (
        "warning: optim.warmup_steps=50 >= max_steps=40: the learning rate rises for the whole run "
        "and never decays to min_lr; set --config.optim.warmup_steps below 40 for a decay.\n")


def test_sample_hint_names_the_template_and_is_shell_quoted(tmp_path, monkeypatch):
    import json
    import shlex
    monkeypatch.chdir(tmp_path)
    task_run, text_run = tmp_path / "my run", tmp_path / "docs"
    for run, template in ((task_run, "Вопрос: {question}\n### Ответ: {answer}"), (text_run, None)):
        run.mkdir()
        (run / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "template": template}))
    hint = train._sample_hint(str(task_run))
    assert hint == "python sample.py --run 'my run' --template instruct --prompt \"...\""
    assert shlex.split(hint)[3] == "my run"
    assert train._sample_hint(str(text_run)) == 'python sample.py --run docs --prompt "..."'
