"""Regimes, cross-seed statistics and linear CKA against independent references, and `ckptaudit regimes` /
`ckptaudit cross-seed` end to end on real fixture runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import invoke

from ckptaudit.analyses.cross_seed import linear_cka
from ckptaudit.analyses.regimes.run import (
    ProbeSet,
    RegimesResult,
    build_probes,
    parse_thresholds,
    probe_representations,
)
from ckptaudit.errors import UsageError

STEPS = [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500]
SIM = [math.nan, 0.40, 0.80, 0.95, 0.97, 0.90, 0.990, 0.995, 0.998, 0.996, 0.999]


def test_adaptive_thresholds_and_first_entries_on_a_constructed_series():
    res = RegimesResult.from_similarity(STEPS, SIM, fixed=None)
    low, high = np.percentile(np.asarray(SIM[1:]), [30, 70])
    assert res.thresholds.rule == "adaptive"
    assert res.thresholds.low == pytest.approx(low) and res.thresholds.high == pytest.approx(high)
    expected = ["unknown"] + ["stable" if s > high else "chaotic" if s < low else "transition" for s in SIM[1:]]
    assert list(res.regime) == expected
    first = {r: next((t for t, g in zip(STEPS, expected, strict=True) if g == r), None) for r in ("chaotic", "transition", "stable")}
    assert res.first_entry == first
    assert res.first_entry["chaotic"] == 50  # the two lowest similarities come first


def test_fixed_thresholds():
    res = RegimesResult.from_similarity(STEPS, SIM, fixed=parse_thresholds("0.9,0.996"))
    assert res.thresholds.rule == "fixed" and (res.thresholds.low, res.thresholds.high) == (0.9, 0.996)
    assert list(res.regime) == ["unknown", "chaotic", "chaotic", "transition", "transition", "transition",
                                "transition", "transition", "stable", "transition", "stable"]  # fmt: skip
    assert res.first_entry == {"chaotic": 50, "transition": 150, "stable": 400}
    j = res.to_json()
    assert {"steps", "similarity", "regime", "thresholds", "first_entry"} <= set(j)
    for bad in ("0.9", "a,b", "0.99,0.9"):
        with pytest.raises(UsageError):
            parse_thresholds(bad)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _cka_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with Gram matrices and the centring matrix H: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: float(np.trace(a @ h @ b @ h))  # noqa: E731
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_invariances_and_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 9, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(40, 9, generator=gen, dtype=torch.float64)
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert base == pytest.approx(_cka_brute_force(x.numpy(), y.numpy()), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(x @ _orthogonal(6, 1), y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, y @ _orthogonal(9, 2)) == pytest.approx(base, rel=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 3.0, y) == pytest.approx(base, rel=1e-10)  # column centring removes offsets
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-12)


def test_probe_representation_is_the_masked_mean_of_the_last_hidden_state():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rep = probe_representations(model, ProbeSet(ids, mask, "test"))
    with torch.no_grad():
        short = model(input_ids=torch.tensor([[7, 8]]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        full = model(input_ids=ids[:1], output_hidden_states=True).hidden_states[-1][0].mean(0)
    torch.testing.assert_close(rep[1], short.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rep[0], full.double(), rtol=1e-5, atol=1e-6)


def test_fingerprints_refuse_a_later_checkpoint_that_does_not_fit_the_model(tmp_path):
    """The model built from the first checkpoint is refilled for the next ones: a tensor of another shape there is a
    one-line error naming that checkpoint's file, the tensor and both shapes (it used to be copied unchecked)."""
    from conftest import tiny_gpt2_config
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    from ckptaudit.analyses.regimes.run import run_fingerprints
    from ckptaudit.errors import CorruptFileError
    from ckptaudit.io.discover import discover_run

    torch.manual_seed(0)
    for step in (0, 1):
        GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(tmp_path / f"checkpoint-{step}")
    weights = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    weights["transformer.ln_f.weight"] = torch.ones(31)
    save_file(weights, tmp_path / "checkpoint-1" / "model.safetensors", metadata={"format": "pt"})
    ids = torch.arange(8).reshape(2, 4)
    with pytest.raises(CorruptFileError) as err:
        run_fingerprints(discover_run(tmp_path), ProbeSet(ids, torch.ones_like(ids), "test"))
    message = str(err.value)
    assert "\n" not in message and "checkpoint-1" in message and "checkpoint-0" not in message
    assert "tensor transformer.ln_f.weight has shape (31,), the model expects (32,)" in message


@pytest.mark.slow
def test_regimes_cli_on_tiny_run(tiny_run):
    res = invoke("regimes", str(tiny_run), "--json", "--no-report", "--device", "cpu")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert {"steps", "similarity", "regime", "thresholds", "first_entry"} <= set(s)
    assert s["steps"] == [0, 10, 20, 30, 40, 50, 60]
    assert s["similarity"][0] is None and s["regime"][0] == "unknown"
    assert s["thresholds"]["rule"] == "adaptive"
    assert "validation inputs" in s["probes"]
    # s_t between steps 50 and 60 recomputed independently (transformers' own loader, the same probe inputs)
    from transformers import GPT2LMHeadModel

    from ckptaudit.tasks import task_from_checkpoint_dir

    probes = build_probes(tiny_run / "checkpoint-0", None, None, task_from_checkpoint_dir(tiny_run / "checkpoint-0"))
    fp = []
    for step in (50, 60):
        m = GPT2LMHeadModel.from_pretrained(tiny_run / f"checkpoint-{step}").eval()
        with torch.no_grad():
            fp.append(m(input_ids=probes.input_ids, output_hidden_states=True).hidden_states[-1].double().mean(1).reshape(-1))
    cos = float(fp[0] @ fp[1] / (fp[0].norm() * fp[1].norm()))
    assert s["similarity"][6] == pytest.approx(cos, rel=1e-6)


@pytest.fixture(scope="module")
def two_seed_runs(tmp_path_factory):
    """Two very small real runs (modadd p=11, 1 layer, 20 steps, checkpoints every 5) differing only in seed."""
    from ckptaudit.tasks import get_task
    from ckptaudit.tasks.train import train_run

    root = tmp_path_factory.mktemp("seeds")
    task = get_task("modadd", p=11)
    config = task.model_config(n_layer=1, n_embd=16, n_head=2)
    for seed in (0, 1):
        train_run(root / f"seed{seed}", task, config, steps=20, save_steps=5, lr=1e-2, batch_size=32, seed=seed)
    return root


def _first_entries_by_hand(root, seeds, steps):
    """Per seed: s_t from transformers-loaded models (masked mean of the last hidden state over the CLI's probe
    inputs, cosine in numpy), pooled 30th/70th percentile thresholds, regimes, first entry of each regime; and the
    population std of each regime's first entry over the seeds that entered it (None when fewer than two)."""
    from transformers import GPT2LMHeadModel

    from ckptaudit.tasks import task_from_checkpoint_dir

    first_dir = root / f"seed{seeds[0]}" / f"checkpoint-{steps[0]}"  # the CLI builds one probe set from the first run
    config = json.loads((first_dir / "config.json").read_text())
    probes = build_probes(first_dir, config, None, task_from_checkpoint_dir(first_dir), 0)
    mask = probes.attention_mask.double().unsqueeze(-1).numpy()
    sims = []
    for seed in seeds:
        fps = []
        for step in steps:
            model = GPT2LMHeadModel.from_pretrained(root / f"seed{seed}" / f"checkpoint-{step}").eval()
            with torch.no_grad():
                out = model(input_ids=probes.input_ids, attention_mask=probes.attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1].double().numpy()
            fps.append(((hidden * mask).sum(1) / mask.sum(1)).reshape(-1))
        sims.append([float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(fps[1:], fps[:-1])])
    low, high = np.percentile(np.concatenate(sims), [30, 70])
    firsts = []
    for sim in sims:
        regime = ["stable" if x > high else "chaotic" if x < low else "transition" for x in sim]
        firsts.append({r: next((t for t, g in zip(steps[1:], regime) if g == r), None)
                       for r in ("chaotic", "transition", "stable")})  # fmt: skip
    std = {}
    for r in ("chaotic", "transition", "stable"):
        entered = [f[r] for f in firsts if f[r] is not None]
        std[r] = float(np.std(entered)) if len(entered) >= 2 else None
    return sims, firsts, std


@pytest.mark.slow
def test_cross_seed_cli(two_seed_runs, tmp_path):
    import h5py

    out = tmp_path / "cs.h5"
    runs = [str(two_seed_runs / "seed0"), str(two_seed_runs / "seed1")]
    res = invoke("cross-seed", *runs, "--json", "--device", "cpu", "--out", str(out))
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert {"loss_cv", "first_entry_std", "regime_agreement", "cka"} <= set(s)
    finals = [json.loads((two_seed_runs / f"seed{i}" / "checkpoint-20" / "trainer_state.json").read_text())
              ["log_history"][-1]["eval_loss"] for i in (0, 1)]  # fmt: skip
    assert s["loss_cv"] == pytest.approx(np.std(finals) / np.mean(finals), rel=1e-5)
    assert s["cka"]["steps"] == [0, 5, 10, 15, 20]
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in s["cka"]["mean"])
    # first entries and their std recomputed from the checkpoints without ckptaudit's loaders or fingerprints
    sim, first, std = _first_entries_by_hand(two_seed_runs, (0, 1), [0, 5, 10, 15, 20])
    for i in (0, 1):
        assert s["seeds"][i]["similarity"][0] is None
        assert s["seeds"][i]["similarity"][1:] == pytest.approx(sim[i], rel=1e-6)
        assert s["seeds"][i]["first_entry"] == first[i]
    assert set(s["first_entry_std"]) == set(std)
    for regime, value in std.items():
        assert s["first_entry_std"][regime] == (None if value is None else pytest.approx(value)), regime
    regimes = [x["regime"] for x in s["seeds"]]
    usable = [i for i in range(5) if all(r[i] != "unknown" for r in regimes)]
    assert s["regime_agreement"] == pytest.approx(sum(regimes[0][i] == regimes[1][i] for i in usable) / len(usable))
    with h5py.File(out) as f:
        assert "cross_seed/cka/mean" in f and "loss_cv" in f["cross_seed"].attrs


def test_cross_seed_needs_two_runs(tiny_run):
    res = invoke("cross-seed", str(tiny_run), "--no-report")
    assert res.exit_code == 2
