"""Packed documents (docs/data.md#documents, docs/attention.md#documents): the loader's segment ids
and positions by hand, and a packed window whose documents never see each other, for every head
plan and every attention path that runs on this CPU (XLA, the blockwise kernel, the Pallas TPU
kernel in interpret mode): logits and gradients equal each document run alone, one document equals
the unmasked call bit for bit, and a planted key reaches no query of the next row."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from reflex_jax.data import (BatchLoader, TokenData, packed_documents, prepare, prepare_task,
                             val_batches)
from reflex_jax.kernels import KernelChoices
from reflex_jax.model import Decoder, ModelConfig, init_params
from reflex_jax.model.layers import Attention
from reflex_jax.run_config import base_config
from reflex_jax.train import validation
from reflex_jax.train.program import TrainProgram
from reflex_jax.train.step import StepSettings
from marks import fast_only, slow
from tolerance import order_atol

PLANS = ["none", "all", "recent:1,1", ((), ((0, 1),), ((1, 1), (0, 1)), ((2, 1), (0, 1))), "gqa:2",
         "kv:4,3,2,1", "cla:2", "yoco", "fewer:all", "sharev:all", "route", "value_residual"]
PLAN_IDS = ["none", "all", "recent", "explicit", "gqa", "kv", "cla", "yoco", "fewer", "sharev",
            "route", "value_residual"]
# (attention, kernels, T, document lengths): each layout has a boundary inside a kernel block and
# one on a block edge (the CPU kernels' query blocks are 64 at T=128; splash's 128 at T=384)
BACKENDS = {
    "xla": ("xla", KernelChoices(attention_blocks=False, blockwise_backward=False), 128, (37, 27, 64)),
    "blockwise": ("xla", KernelChoices(), 128, (37, 27, 64)),
    "splash": ("flash", KernelChoices(platform="tpu", pallas_interpret=True), 384, (100, 156, 128)),
}


LAYERS = 4


def _cfg(plan, T, attention="xla", vocab_size=67, **kw):
    extra = {"value_residual": True} if plan == "value_residual" else {}
    return ModelConfig(n_layer=LAYERS, n_head=4, n_embd=32, vocab_size=vocab_size, block_size=T,
                       head_plan="all" if plan == "value_residual" else plan, attention=attention,
                       **extra, **kw)


def _layout(lengths, B=2):
    return {k: jnp.asarray(v) for k, v in packed_documents([lengths] * B, sum(lengths)).items()}


def _ce_sum(logits_BTV, tokens_BT, lo, hi):
    """Sum of next-token CE of the targets lo+1..hi-1 (predicted at lo..hi-2): inside one document."""
    logp = jax.nn.log_softmax(logits_BTV[:, lo:hi - 1].astype(jnp.float32))
    return -jnp.sum(jnp.take_along_axis(logp, tokens_BT[:, lo + 1:hi, None], -1))


# ---- the loader --------------------------------------------------------------------------------

def _rows_dir(tmp_path, lengths, name="rows"):
    """A prepared byte-level directory of rows with the given answer lengths."""
    import json
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"question": "в" * (i % 3 + 1), "answer": "x" * n},
                                      ensure_ascii=False) + "\n" for i, n in enumerate(lengths)),
                   encoding="utf-8")
    prepare(str(src), "bytes", str(tmp_path / name), val_fraction=0, progress=False, verbose=False)
    return TokenData.open(str(tmp_path / name))


def _by_hand(index, starts):
    """(segment ids, positions) of one window reading the stream at `index`, by a plain scan."""
    seg, pos, cur, here = [], [], 0, 0
    for t, i in enumerate(index):
        new = t > 0 and (i in starts or i != index[t - 1] + 1)
        if new:
            cur, here = cur + 1, 0
        seg.append(cur)
        pos.append(here)
        here += 1
    return seg, pos


def test_loader_documents_by_hand_and_the_switch_keeps_the_windows(tmp_path):
    """Segment ids count the row starts (and the wrap to the split's start) inside each window, and
    positions restart there; a window starting inside a long row starts at position 0. With the
    switch off the batch is exactly the one without documents (same windows, no extra arrays)."""
    d = _rows_dir(tmp_path, [3, 40, 5, 90, 2, 7])
    n = len(d.split("train"))
    starts = set(d.offsets("train")[:-1].tolist())
    for seq_len in (16, 50, 300):  # 300: longer than the whole split, so windows wrap
        plain = BatchLoader(d, "train", 8, seq_len, seed=1)
        packed = BatchLoader(d, "train", 8, seq_len, seed=1, documents=True)
        for step in range(3):
            a, b = plain.batch(step), packed.batch(step)
            assert set(a) == {"tokens", "mask"} and set(b) == {"tokens", "mask", "segment_ids", "positions"}
            assert all(np.array_equal(a[k], b[k]) for k in a)
            assert b["segment_ids"].dtype == b["positions"].dtype == np.int32
            for row, s in enumerate(packed.global_starts(step)):
                index = [(int(s) + t) % n for t in range(seq_len + 1)]
                seg, pos = _by_hand(index, starts)
                assert b["segment_ids"][row].tolist() == seg and b["positions"][row].tolist() == pos
    # a long row split into windows: the later windows start inside it, at position 0
    inside = [s for s in BatchLoader(d, "train", 8, 16, 0).starts.tolist() if s not in starts]
    assert inside


def test_text_documents_are_files(tmp_path):
    """For .txt data a document is a file: a window across two files gets two segment ids."""
    src = tmp_path / "books"
    src.mkdir()
    (src / "a.txt").write_text("а" * 30, encoding="utf-8")
    (src / "b.txt").write_text("б" * 30, encoding="utf-8")
    prepare(str(src), "bytes", str(tmp_path / "out"), val_fraction=0, progress=False, verbose=False)
    d = TokenData.open(str(tmp_path / "out"))
    off = d.offsets("train")
    assert len(off) == 3  # one row per file
    loader = BatchLoader(d, "train", 16, 40, seed=0, documents=True)
    b = loader.batch(0)
    for row, s in enumerate(loader.global_starts(0)):
        index = [(int(s) + t) % int(off[-1]) for t in range(41)]
        seg, pos = _by_hand(index, set(off[:-1].tolist()))
        assert b["segment_ids"][row].tolist() == seg and b["positions"][row].tolist() == pos
    assert b["segment_ids"].max() >= 1


def test_val_batches_carry_each_rows_document(tmp_path):
    prepare_task("kv_recall", str(tmp_path / "kv"), n_train=8, n_val=40, verbose=False)
    d = TokenData.open(str(tmp_path / "kv"))
    plain, packed = val_batches(d, 4, 256, 3), val_batches(d, 4, 256, 3, documents=True)
    starts = set(d.offsets("val")[:-1].tolist())
    stream = np.asarray(d.split("val"))
    for a, b in zip(plain, packed):
        assert all(np.array_equal(a[k], b[k]) for k in a)
        for row in range(4):
            real = int(b["valid"][row].sum())
            if not real:
                continue
            first = next(s for s in sorted(starts)
                         if np.array_equal(stream[s:s + real], b["tokens"][row, :real]))
            seg, pos = _by_hand(list(range(first, first + real)), starts)
            assert b["segment_ids"][row, :real].tolist() == seg
            assert b["positions"][row, :real].tolist() == pos


# ---- the model: packed documents equal each document alone ----------------------------------------

def _packed_and_alone(plan, backend, pos_emb="learned"):
    attention, kernels, T, lengths = BACKENDS[backend]
    cfg = _cfg(plan, T, attention, pos_emb=pos_emb)
    model = Decoder(cfg, kernels=kernels)
    # the documents alone are not multiples of the TPU kernel's block: XLA runs them
    reference = model if attention == "xla" else Decoder(_cfg(plan, T, "xla", pos_emb=pos_emb))
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)), jnp.int32)
    doc = _layout(lengths)
    bounds = np.cumsum((0,) + lengths)

    def packed(p):
        logits = model.apply({"params": p}, tokens, segment_ids_BT=doc["segment_ids"],
                             positions_BT=doc["positions"])
        return sum(_ce_sum(logits, tokens, a, b) for a, b in zip(bounds[1:-1], bounds[2:])), logits

    def alone(p):
        loss, outs = 0.0, []
        for a, b in zip(bounds[1:-1], bounds[2:]):
            logits = reference.apply({"params": p}, tokens[:, a:b])
            loss, outs = loss + _ce_sum(logits, tokens[:, a:b], 0, b - a), outs + [logits]
        return loss, jnp.concatenate(outs, axis=1)
    got = jax.jit(jax.value_and_grad(packed, has_aux=True))(params)
    want = jax.jit(jax.value_and_grad(alone, has_aux=True))(params)
    return got, want, bounds


def _assert_packed_equals_alone(plan, backend, pos_emb="learned"):
    ((loss, logits), grads), ((loss_a, logits_a), grads_a), bounds = _packed_and_alone(
        plan, backend, pos_emb)
    np.testing.assert_allclose(np.asarray(logits[:, bounds[1]:]), np.asarray(logits_a),
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(float(loss), float(loss_a), rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g_a = grads_a
        for k in path:
            g_a = g_a[k.key]
        # a leaf's near-zero entries differ by rounding of the size of its largest ones (an
        # AMX Xeon: 4.5e-6 on an o bias entry of -0.0074 beside entries of 30); documents that
        # saw each other would move the gradients by far more
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_a), rtol=2e-4,
                                   atol=max(2e-6, order_atol(g_a, depth=LAYERS)),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("plan", fast_only(PLANS, "all", "route"), ids=PLAN_IDS)
@pytest.mark.parametrize("backend", ["blockwise", fast_only(["xla"])[0]])
def test_packed_documents_equal_each_document_alone(plan, backend):
    """A | B | C packed in one window: B's and C's logits, and the gradients of their loss, equal
    B and C run alone (learned positions restart at each document), for every head plan."""
    _assert_packed_equals_alone(plan, backend)


@pytest.mark.parametrize("plan", fast_only(["none", "all", "sharev:all"], "all"))
def test_rope_positions_restart_per_document(plan):
    _assert_packed_equals_alone(plan, "blockwise", pos_emb="rope")


@slow
@pytest.mark.parametrize("plan", ["none", "all", "cla:2", "route"])
def test_pallas_kernel_keeps_documents_apart(plan):
    """The Pallas TPU kernel (interpret mode) with splash's segment ids: as above, at T=384 in
    blocks of 128, one boundary inside a block and one on a block edge."""
    _assert_packed_equals_alone(plan, "splash")


@slow
def test_pallas_kernel_with_segment_ids_equals_xla():
    """Values and q/k/v gradients of the kernel with segment ids equal XLA's masked attention."""
    from reflex_jax.kernels.attention import multihead_attention
    B, T, H, D = 2, 384, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in keys[:3])
    w = jax.random.normal(keys[3], (B, T, H, D))
    seg = _layout((100, 156, 128))["segment_ids"]

    def loss(attention, kernels):
        return lambda q, k, v: jnp.sum(multihead_attention(
            q, k, v, segment_ids_BT=seg, implementation=attention, kernels=kernels) * w)
    pallas = loss("flash", BACKENDS["splash"][1])
    xla = loss("xla", BACKENDS["xla"][1])
    assert "pallas_call" in str(jax.make_jaxpr(pallas)(q, k, v))
    got, want = (jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v) for f in (pallas, xla))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", ["blockwise", "xla"])
def test_one_document_equals_the_unmasked_call_bit_for_bit(backend):
    attention, kernels, T, _ = BACKENDS[backend]
    cfg = _cfg("all", T, attention, pos_emb="rope")
    model = Decoder(cfg, kernels=kernels)
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)), jnp.int32)
    doc = _layout((T,))

    def loss(p, with_documents):
        extra = dict(segment_ids_BT=doc["segment_ids"], positions_BT=doc["positions"])
        logits = model.apply({"params": p}, tokens, **(extra if with_documents else {}))
        return _ce_sum(logits, tokens, 0, T), logits
    for_both = [jax.jit(jax.value_and_grad(lambda p, w=w: loss(p, w), has_aux=True))(params)
                for w in (True, False)]
    for a, b in zip(*(jax.tree_util.tree_leaves(x) for x in for_both)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _tiny_program_config(document_mask: bool):
    c = base_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = 3, 4, 32
    c.model.vocab_size, c.model.block_size, c.model.head_plan = 67, 64, "all"
    c.batch_size, c.max_steps, c.data.document_mask = 4, 10, document_mask
    return c


def test_train_step_with_one_document_per_row_is_todays_step_bit_for_bit():
    """The switch on, every row one document: the compiled train step gives the loss and params of
    the switch off, bit for bit; with two documents per row it does not."""
    on, off = TrainProgram(_tiny_program_config(True)), TrainProgram(_tiny_program_config(False))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 67, (4, 65)).astype(np.int32)
    batch = {"tokens": tokens, "mask": np.ones((4, 65), np.float32)}
    one_doc = packed_documents([[65]] * 4, 65)
    two_docs = packed_documents([[30, 35]] * 4, 65)
    results = []
    for program, extra in ((off, {}), (on, one_doc), (on, two_docs)):
        state = program.init_state()
        state, m = program.train_step(state, program.put_batch({**batch, **extra}))
        results.append((float(m["loss"]), jax.device_get(state.params)))
    (loss_off, p_off), (loss_one, p_one), (loss_two, _) = results
    assert loss_off == loss_one and loss_two != loss_off
    for a, b in zip(jax.tree_util.tree_leaves(p_off), jax.tree_util.tree_leaves(p_one)):
        assert np.array_equal(a, b)


def test_a_program_with_the_switch_on_refuses_batches_without_documents():
    from reflex_jax.errors import TrainingError
    on = TrainProgram(_tiny_program_config(True))
    with pytest.raises(TrainingError, match="has no 'segment_ids' array.*data.document_mask"):
        on.put_batch({"tokens": np.zeros((4, 65), np.int32), "mask": np.zeros((4, 65), np.float32)})


# ---- a recall question never sees the row before it ---------------------------------------------

def _recall_window():
    """Two key-value recall rows packed into one window, the first holding the second row's
    asked-about key with another value (planted), and the same window with the first row replaced
    by other tokens of its length; and the two rows' lengths."""
    from reflex_jax.data import ByteTokenizer, render_prompt
    tok = ByteTokenizer()
    question = {"question": "Запомни: кот — 3, луг — 5. Сколько у кота?", "answer": "3"}
    planted = {"question": "Запомни: кот — 7, мёд — 1. Сколько у кота?", "answer": "7"}
    ids = [[tok.bos_id] + tok.encode(render_prompt(r["question"]) + r["answer"]) + [tok.eos_id]
           for r in (planted, question)]
    other = np.random.default_rng(5).integers(0, 256, len(ids[0])).tolist()
    return [ids[0] + ids[1], other + ids[1]], (len(ids[0]), len(ids[1]))


@pytest.mark.parametrize("plan", fast_only(PLANS, "all", "sharev:all", "route"), ids=PLAN_IDS)
@pytest.mark.parametrize("backend", ["blockwise", "xla"])
def test_a_planted_key_gets_no_attention_from_the_next_rows_question(plan, backend):
    """Every layer's attention output (all its heads, self and cross) and its K/V at the question's
    tokens are the same bit for bit whether the row before holds the planted key or other tokens:
    the question gives the planted row exactly zero weight. Without segment ids they differ."""
    windows, (n0, n1) = _recall_window()
    T = n0 + n1
    attention, kernels, _, _ = BACKENDS[backend]
    cfg = _cfg(plan, T, attention, vocab_size=259)  # byte tokens
    model = Decoder(cfg, kernels=kernels)
    params = init_params(cfg, jax.random.PRNGKey(2))
    doc = _layout((n0, n1), B=1)

    def attention_outputs(tokens, documents):
        extra = dict(segment_ids_BT=doc["segment_ids"], positions_BT=doc["positions"])
        _, state = model.apply({"params": params}, jnp.asarray([tokens], jnp.int32),
                               **(extra if documents else {}),
                               capture_intermediates=lambda m, _: isinstance(m, Attention),
                               mutable=["intermediates"])
        inter = state["intermediates"]
        return [jax.tree_util.tree_map(lambda x: np.asarray(x[:, n0:]),
                                       inter[f"h_{i}"]["attn"]["__call__"][0])
                for i in range(cfg.n_layer)]
    for documents, same in ((True, True), (False, False)):
        a, b = (attention_outputs(w, documents) for w in windows)
        equal = [all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(la),
                                                          jax.tree_util.tree_leaves(lb)))
                 for la, lb in zip(a, b)]
        assert all(equal) if same else not any(equal), (documents, equal)


# ---- the eval pass --------------------------------------------------------------------------------

def test_eval_losses_of_packed_rows_equal_each_row_alone(tmp_path):
    """The eval step's per-target losses over validation windows of packed rows equal each row's
    losses run alone (the eval pass, bits per byte and answer loss all sum these); without the
    documents, the rows after a window's first do not."""
    prepare_task("kv_recall", str(tmp_path / "kv"), n_train=8, n_val=12, verbose=False)
    d = TokenData.open(str(tmp_path / "kv"))
    cfg = _cfg("all", 320, vocab_size=259)
    settings = StepSettings(Decoder(cfg), "all")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ce = jax.jit(lambda p, b: validation.token_losses(settings, p, b))
    alone = {tuple(t.tolist()): np.asarray(ce(params, {"tokens": jnp.asarray(t[None], jnp.int32)}))[0]
             for t, _ in d.rows("val")}
    packed = val_batches(d, 4, 320, 100, documents=True)
    for documents in (True, False):
        checked = later = 0
        for b, b_doc in zip(val_batches(d, 4, 320, 100, documents=documents), packed):
            got = np.asarray(ce(params, b))
            for row in range(4):
                seg = b_doc["segment_ids"][row][b_doc["valid"][row] > 0]
                for s in np.unique(seg):
                    at = np.flatnonzero(seg == s)
                    want = alone[tuple(b["tokens"][row, at].tolist())]
                    same = np.allclose(got[row, at[:-1]], want, rtol=1e-5, atol=1e-5)
                    checked += 1
                    later += int(s > 0)
                    assert same if (documents or s == 0) else not same
        assert checked == len(alone) and later > 0
