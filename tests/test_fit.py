"""reflex_lab.fit: the search over model sizes (synthetic memory curves) and one real search
compiled for a deviceless GPU."""
import json
import types

import pytest

from reflex_lab import fit

from marks import needs_cuda  # skips, naming the plugin

GiB = 2**30


class CurveProber:
    """A Prober whose compiled totals follow a known curve: state 12 B/param, temporaries
    4 B/param + 300 B per token-layer-n_embd, as a train step's roughly do."""
    def __init__(self, hbm, refuse_confirm=()):
        self.target = types.SimpleNamespace(n_devices=4, chip=types.SimpleNamespace(hbm_bytes=hbm))
        self.base = types.SimpleNamespace(batch_size=16, grad_accum=2,
                                          model=types.SimpleNamespace(block_size=2048))
        self.probed, self.refuse_confirm = [], refuse_confirm

    def state_bytes(self, n_layer, n_embd):
        return 12 * 16 * n_layer * n_embd**2 / 4

    def total(self, n_layer, n_embd):
        return self.state_bytes(n_layer, n_embd) * 4 / 3 + 300 * 4096 * n_layer * n_embd

    def probe(self, n_layer, n_embd):
        self.probed.append(n_embd)
        t = self.total(n_layer, n_embd)
        return {"n_embd": n_embd, "peak_total_bytes": t, "fits": t <= self.target.chip.hbm_bytes}

    def confirm(self, n_layer, n_embd):
        return {"fits": n_embd not in self.refuse_confirm}

    def keep(self, *keys):
        pass


def _args(**kw):
    base = dict(step=512, min_embd=512, max_embd=32768, start_embd=0, no_confirm=False)
    return types.SimpleNamespace(**{**base, **kw})


def _search(prober, n_layer, **kw):
    record = {"probes": []}
    fit.search(prober, n_layer, _args(**kw), prober.target.chip.hbm_bytes, lambda: None, record)
    return record


@pytest.mark.parametrize("hbm_gib,n_layer", [(16, 6), (95, 6), (95, 12), (30, 24)])
def test_search_finds_the_boundary_of_the_grid(hbm_gib, n_layer):
    p = CurveProber(hbm_gib * GiB)
    rec = _search(p, n_layer)
    best = max(d for d in range(512, 32769, 512) if p.total(n_layer, d) <= hbm_gib * GiB)
    assert rec["largest_fit"]["n_embd"] == best
    assert rec["smallest_no_fit"]["n_embd"] == best + 512
    assert len(p.probed) == len(set(p.probed)) <= 6  # no point compiled twice, few compiles


def test_search_steps_down_when_the_full_dry_run_does_not_fit():
    p = CurveProber(95 * GiB)
    best = _search(CurveProber(95 * GiB), 6)["largest_fit"]["n_embd"]
    p.refuse_confirm = (best,)  # another function is larger than the train step there
    rec = _search(p, 6)
    assert rec["largest_fit"]["n_embd"] == best - 512
    assert rec["smallest_no_fit"]["n_embd"] == best


def test_search_reports_when_nothing_or_everything_fits():
    assert "nothing" in _search(CurveProber(1), 6)["note"]
    rec = _search(CurveProber(10**15), 6, max_embd=2048)
    assert rec["largest_fit"]["n_embd"] == 2048 and rec["smallest_no_fit"] is None
    assert "everything" in rec["note"]


@needs_cuda
def test_fit_compiles_for_a_deviceless_gpu(tmp_path, capsys):
    """A tiny config on one deviceless H100 fits at every grid point; the full dry run of the
    largest reuses the train step the search compiled."""
    out = tmp_path / "fit.json"
    status = fit.main(["--target", "gpu:h100x1", "--config", "configs/tiny.py", "--n_layer", "2",
                       "--head_dim", "16", "--step", "64", "--min_embd", "64",
                       "--max_embd", "128", "--out", str(out), "--config.batch_size=8"])
    assert status == 0
    doc = json.loads(out.read_text())
    (search,) = doc["searches"]
    assert search["largest_fit"]["n_embd"] == 128 and search["smallest_no_fit"] is None
    full = search["largest_fit"]["confirmed"]
    assert full["fits"] and set(full["functions"]) == {"train_step", "eval_step", "prefill",
                                                       "decode"}
    assert full["functions"]["train_step"]["compile_s"] < 1.0  # from the in-memory cache
    assert search["largest_fit"]["params"] > 0 and doc["mesh"]["fsdp"] == 1


@needs_cuda  # the target resolves before the overrides are checked
def test_fit_refuses_what_the_search_sets(capsys):
    with pytest.raises(SystemExit) as e:
        fit.main(["--target", "gpu:h100x1", "--config.model.n_embd=256"])
    assert e.value.code == 2
    assert "--config.model.n_embd is what the search sets" in capsys.readouterr().err
