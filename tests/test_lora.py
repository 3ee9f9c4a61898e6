"""LoRA fine-tuning (train/lora.py): adapters merged into a frozen base equal the unmerged adapter
model, only the adapters train and are saved, a run resumes exactly, the base is checked by its
fingerprint, and sampling, export and load_params give the merged model."""
import dataclasses
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import checkpoint as ckpt
from reflex_jax.errors import CheckpointError, ConfigError, TrainingError
from reflex_jax.model import Decoder, ModelConfig, abstract_params, init_params
from reflex_jax.run_config import model_config_from
from reflex_jax.train import lora
from reflex_jax.train.program import TrainProgram
from reflex_jax.train.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import read_metrics, small_config  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 259, (2, 12)).astype(np.int32)


def tiny(**kw):
    return ModelConfig(**{**dict(vocab_size=259, block_size=16, n_layer=3, n_head=4, n_embd=32,
                                 mlp_hidden=48), **kw})


def random_base(cfg, seed=0):
    """Base params drawn with numpy onto the abstract tree (eager flax init takes seconds)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * noise
        if name.endswith("['value_mix']"):
            return np.full(leaf.shape, 0.5, np.float32)
        return 0.02 * noise
    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def random_adapters(cfg, spec, seed=1):
    """Adapters with a non-zero B (a trained state), drawn onto the adapter shapes."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
        lora.abstract_adapters(cfg, spec))


def unmerged_logits(cfg, base, adapters, spec, tokens):
    """The adapter model computed the unmerged way: every adapted layer's output plus
    (alpha/r) · (x A) B, added by intercepting the layer (no weights merged)."""
    flat = lora._flat(adapters)
    cfg = dataclasses.replace(cfg, scan_layers="off")  # every layer's modules under its own name

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        ab = flat.get(tuple(context.module.scope.path)) if context.method_name == "__call__" else None
        if ab is None:
            return out
        n_in = lora.IN_AXES[context.module.scope.path[-1]]
        x = args[0].astype(jnp.float32)
        xa = jnp.tensordot(x, ab["lora_a"], axes=n_in, precision="highest")
        return out + spec.scale * jnp.tensordot(xa, ab["lora_b"], axes=1, precision="highest")

    def apply(base, adapters, tokens):
        with nn.intercept_methods(interceptor):
            return Decoder(cfg).apply({"params": base}, tokens)
    return jax.jit(apply)(base, adapters, tokens)


def logits(cfg, params, tokens=TOKENS):
    return np.asarray(jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))(params, tokens))


# ---- the adapters and the merge (no training) ----------------------------------------------------

def test_adapters_follow_each_layers_head_split():
    cfg = tiny(head_plan="cla:2")  # layer 1 borrows all its K/V: no k/v kernels, no k/v adapters
    spec = lora.make_spec(4, 8.0, "q,kv,o,mlp")
    shapes = jax.tree_util.tree_map(lambda s: s.shape, lora.abstract_adapters(cfg, spec))
    E, D = cfg.n_embd, cfg.head_dim
    for layer, plan in enumerate(cfg.layers):
        attn = shapes[f"h_{layer}"]["attn"]
        assert attn["q"] == {"lora_a": (E, 4), "lora_b": (4, plan.n_query, D)}
        assert attn["o"] == {"lora_a": (plan.n_query, D, 4), "lora_b": (4, E)}
        if plan.n_k:
            assert attn["k"] == {"lora_a": (E, 4), "lora_b": (4, plan.n_k, D)}
        else:
            assert "k" not in attn and "v" not in attn
        assert shapes[f"h_{layer}"]["mlp"]["down"] == {"lora_a": (48, 4), "lora_b": (4, E)}
    assert cfg.layers[1].n_k == 0
    only_q = lora.make_spec(2, 2.0, "q")
    assert jax.tree_util.tree_structure(lora.abstract_adapters(cfg, only_q)) == \
        jax.tree_util.tree_structure({f"h_{i}": {"attn": {"q": {"lora_a": 0, "lora_b": 0}}}
                                      for i in range(3)})


def test_fresh_adapters_give_the_base_exactly():
    cfg = tiny(head_plan="all")
    spec = lora.make_spec(4, 16.0, "q,kv,o,mlp")
    base = random_base(cfg)
    adapters = lora.init_adapters(cfg, spec, jax.random.PRNGKey(1))
    a_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "lora_a" in str(p)]
    assert all(np.abs(np.asarray(a)).max() > 0 for a in a_leaves)  # A random, B zero
    merged = lora.merge(base, adapters, spec)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, base)
    np.testing.assert_array_equal(logits(cfg, merged), logits(cfg, base))


@pytest.mark.parametrize("kw, targets", [
    (dict(head_plan="all", pos_emb="rope"), "q,kv,o,mlp"),
    (dict(head_plan="cla:2", mlp="gelu", norm="layernorm", value_residual=True), "q,v,o,mlp"),
    (dict(head_plan="gqa:2", bias=False), "k,o"),
])
def test_merged_weights_give_the_adapter_models_logits(kw, targets):
    cfg = tiny(**kw)
    spec = lora.make_spec(3, 6.0, targets)
    base = random_base(cfg)
    adapters = random_adapters(cfg, spec)
    merged = logits(cfg, lora.merge(base, adapters, spec))
    want = np.asarray(unmerged_logits(cfg, base, adapters, spec, TOKENS))
    assert np.abs(merged - logits(cfg, base)).max() > 0.05  # the adapters change the model
    np.testing.assert_allclose(merged, want, atol=2e-5, rtol=0)


def test_fingerprint_sees_one_bit_and_not_the_layout():
    cfg = tiny()
    params = jax.device_put(random_base(cfg))
    fp = lora.fingerprint(params)
    host = jax.tree_util.tree_map(np.asarray, params)
    assert lora.fingerprint(host) == fp and len(fp) == 16
    bumped = jax.tree_util.tree_map(np.copy, host)
    w = bumped["h_1"]["attn"]["o"]["kernel"]
    w.view(np.uint32)[0, 0, 0] ^= 1  # the lowest bit of one value
    assert lora.fingerprint(bumped) != fp
    swapped = jax.tree_util.tree_map(np.copy, host)
    q = swapped["h_0"]["attn"]["q"]["kernel"]
    q[[0, 1]] = q[[1, 0]]  # the same values in another order
    assert lora.fingerprint(swapped) != fp


@pytest.mark.parametrize("field, value, match", [
    ("targets", "q,ffn", r"lora.targets='q,ffn' must be a comma-separated subset of q, k, v, kv, "
                         r"o, mlp \(kv = k and v\), e.g. --config.lora.targets=q,kv,o,mlp\.$"),
    ("targets", "", r"lora.targets='' must be a comma-separated subset"),
    ("rank", -1, r"lora.rank=-1 must be an integer >= 0 \(0 turns LoRA off\)"),
    ("alpha", 0.0, r"lora.alpha=0.0 must be a positive number"),
    ("init_from", "", r"lora.rank=4 trains adapters on a frozen base; set --config.init_from"),
])
def test_bad_lora_settings_are_one_sentence(tmp_path, field, value, match):
    c = small_config(tmp_path / "run", init_from=str(tmp_path / "base"))
    c.lora.rank = 4
    if field == "init_from":
        c.init_from = value
    else:
        c.lora[field] = value
    with pytest.raises(ConfigError, match=match) as e:
        Trainer(c, log=lambda s: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_optimizer_state_holds_the_adapters_only(tmp_path):
    c = small_config(tmp_path / "run", init_from=str(tmp_path / "base"))
    full = TrainProgram(c).abstract_state
    c.lora.rank = 4
    program = TrainProgram(c)
    state = program.abstract_state
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize  # noqa: E731
                              for x in jax.tree_util.tree_leaves(tree))
    arrays = lambda tree: [x for x in jax.tree_util.tree_leaves(tree) if x.ndim]  # noqa: E731
    adapters = state.params
    assert {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)} == {
        "lora_a", "lora_b"}
    # Adam's two moments per adapter, nothing of the base; counts and scalars are the rest
    assert len(arrays(state.opt_state)) == 2 * len(arrays(adapters))
    assert nbytes(arrays(state.opt_state)) == 2 * nbytes(adapters)
    assert nbytes(program.abstract_model_params) == nbytes(full.params)
    assert nbytes(state.opt_state) < nbytes(full.opt_state) / 5


# ---- training runs ---------------------------------------------------------------------------

def lora_config(run_dir, base, **kw):
    c = small_config(run_dir, init_from=str(base), **kw)
    c.lora.rank, c.lora.alpha, c.lora.targets = 4, 8.0, "q,kv,o,mlp"
    # a constant learning rate: a run stopped at step k with max_steps=k continues as if it had
    # never stopped (the schedule does not depend on max_steps)
    c.optim.lr = c.optim.min_lr = 1e-2
    c.optim.warmup_steps = 0
    return c


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = model_config_from(small_config(root / "unused"))
    return str(ckpt.save_params(str(root / "base"), cfg, init_params(cfg, jax.random.PRNGKey(3)),
                                {"tokenizer": "bytes"}))


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A 6-step LoRA run on the base: (its config, its Trainer after train())."""
    c = lora_config(tmp_path_factory.mktemp("lora_run") / "run", base_dir, max_steps=6)
    t = Trainer(c, log=lambda s: None)
    t.train()
    return c, t


@pytest.mark.slow
def test_a_step_trains_only_the_adapters_and_saves_only_them(trained, base_dir):
    c, t = trained
    _, base = ckpt.load_params(base_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(t.program.frozen), base)
    spec = t.program.lora
    fresh = lora.init_adapters(t.program.model_config, spec, jax.random.PRNGKey(c.seed))
    for (path, now), before in zip(jax.tree_util.tree_leaves_with_path(t.state.params),
                                   jax.tree_util.tree_leaves(fresh)):
        assert np.abs(np.asarray(now) - np.asarray(before)).max() > 0, path
    ck = ckpt.RunCheckpoints(c.run_dir, read_only=True)
    saved = ck.restore_params(ck.latest_step())
    jax.tree_util.tree_map(np.testing.assert_array_equal, saved, jax.device_get(t.state.params))
    ref = json.load(open(os.path.join(c.run_dir, "lora.json")))
    assert ref == {"rank": 4, "alpha": 8.0, "targets": "q,kv,o,mlp", "base": base_dir,
                   "base_step": None, "base_fingerprint": lora.fingerprint(base)}
    # load_params gives the merged model
    cfg, merged = ckpt.load_params(c.run_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged,
                           lora.merge(base, saved, spec))


@pytest.mark.slow
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(trained, base_dir, tmp_path):
    c_straight, _ = trained
    c = lora_config(tmp_path / "resumed", base_dir, max_steps=3)
    Trainer(c, log=lambda s: None).train()
    c.max_steps = 6
    lines = []
    t = Trainer(c, log=lines.append)
    t.train()
    assert f"resuming {c.run_dir} from step 3" in lines
    straight = {r["step"]: r["loss"] for r in read_metrics(c_straight.run_dir)}
    rows = read_metrics(c.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [straight[s] for s in range(1, 7)]  # bit for bit
    _, p_straight = ckpt.load_params(c_straight.run_dir, which="latest")
    _, p_resumed = ckpt.load_params(c.run_dir, which="latest")
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_straight, p_resumed)


@pytest.mark.slow
def test_a_changed_or_missing_base_is_one_sentence(trained, base_dir, tmp_path):
    c_run, _ = trained
    base, run = str(tmp_path / "base"), str(tmp_path / "run")
    shutil.copytree(base_dir, base)
    shutil.copytree(c_run.run_dir, run)
    ref = json.load(open(os.path.join(run, "lora.json")))
    json.dump({**ref, "base": base}, open(os.path.join(run, "lora.json"), "w"))
    ckpt.load_params(run)  # the copy loads

    cfg, params = ckpt.load_params(base)
    params["h_0"]["attn"]["q"]["kernel"] = np.asarray(params["h_0"]["attn"]["q"]["kernel"]) * 1.001
    ckpt.save_params(base, cfg, params, {"tokenizer": "bytes"})
    with pytest.raises(CheckpointError, match=rf"the LoRA base '{base}' of '{run}' has changed "
                                              r"since the adapters were trained on it \(fingerprint "
                                              r"\w+ -> \w+\); restore the base they were trained on\.$"):
        ckpt.load_params(run)
    c = lora_config(run, base, max_steps=8)
    with pytest.raises(TrainingError, match=rf"the LoRA base '{base}' has changed since run_dir "
                                            rf"'{run}' was trained on it"):
        Trainer(c, log=lambda s: None).train()

    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=rf"the LoRA base '{base}' of '{run}' does not exist; "
                                              "restore it there"):
        ckpt.load_params(run)
    with pytest.raises(TrainingError, match=rf"the LoRA base '{base}' that run_dir '{run}' was "
                                            "trained on does not exist"):
        Trainer(c, log=lambda s: None).train()

    # other LoRA settings, or none, on a LoRA run's checkpoints
    shutil.copytree(base_dir, base)
    c.lora.rank = 8
    with pytest.raises(TrainingError, match=r"holds LoRA adapters of rank=4, alpha=8, "
                                            r"targets=q,kv,o,mlp but the config asks for rank=8"):
        Trainer(c, log=lambda s: None).train()
    c.lora.rank = 0
    with pytest.raises(TrainingError, match=r"but the config asks for lora.rank=0; resume with "
                                            r"--config.lora.rank=4"):
        Trainer(c, log=lambda s: None).train()


@pytest.mark.slow
def test_sample_and_export_give_the_merged_model(trained, base_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from reflex_jax.cli import convert
    from reflex_jax.cli import sample as sample_cli
    from reflex_jax.sampling import generate
    c, t = trained
    cfg = t.program.model_config
    merged = jax.device_get(t.program.model_params(t.state.params))
    _, base = ckpt.load_params(base_dir)
    prompts = [[5, 17, 3], [40, 41]]
    args = sample_cli.parse_args(["--run", c.run_dir, "--max_new_tokens", "6", "--prompt_tokens",
                                  "5,17,3", "--prompt_tokens", "40,41", "--print_tokens"])
    lines = sample_cli.generate_lines(args)
    want = generate(cfg, merged, prompts, max_new_tokens=6)
    assert lines == [f"{','.join(map(str, p))} | {','.join(map(str, o))}"
                     for p, o in zip(prompts, want)]

    out = str(tmp_path / "hf")
    assert convert.main(["--export", "hf", "--run", c.run_dir, "--out", out]) == 0
    assert json.load(open(os.path.join(out, "reflex_meta.json")))["lora"]["rank"] == 4
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    jax_merged = logits(cfg, merged)
    assert np.abs(jax_merged - logits(cfg, base)).max() > 1e-3  # the adapters moved the model
    np.testing.assert_allclose(got, jax_merged, atol=1e-4, rtol=0)


def test_abstract_params_of_the_base_are_the_models():
    cfg = tiny()
    spec = lora.make_spec(2, 4.0, "mlp")
    merged = jax.eval_shape(lambda p, a: lora.merge(p, a, spec), abstract_params(cfg),
                            lora.abstract_adapters(cfg, spec))
    assert jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), merged) == \
        jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), abstract_params(cfg))


@pytest.mark.slow
def test_the_dry_run_shows_the_frozen_base_the_adapters_and_their_optimizer_state(tmp_path):
    c = lora_config(tmp_path / "run", tmp_path / "nowhere")  # a dry run reads no weights
    program = TrainProgram(c)
    text, rep = program.dry_run()
    pd = rep["per_device_bytes"]
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize  # noqa: E731
                              for x in jax.tree_util.tree_leaves(tree))
    adapters, base = nbytes(program.abstract_state.params), nbytes(program.abstract_model_params)
    assert pd["lora_adapters"] == adapters and pd["params"] == base + adapters
    assert 2 * adapters <= pd["opt_state"] < 2 * adapters + 1024
    assert all(rep["functions"][f]["memory"] for f in ("eval_step", "prefill", "decode"))
    assert (f"per device: params {(base + adapters) / 2**20:,.1f} MiB (frozen base "
            f"{base / 2**20:,.1f} MiB + LoRA adapters {adapters / 2**20:,.1f} MiB)") in text
    assert "['lora']['h_1']['mlp']['down']['lora_b']" in text
