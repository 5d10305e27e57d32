"""fisher (SPEC §2) against independent references: a dense empirical Fisher, dense eigh, finite differences,
Monte Carlo, plain autograd; and the CLI on the tiny fixture run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke

from ckptaudit.analyses.fisher.directions import random_directions
from ckptaudit.analyses.fisher.run import (
    FisherSettings,
    fisher_at_model,
    flat_gradient,
    noise_floor,
    trunk_layout,
)
from ckptaudit.tasks import get_task

M, B, SEED = 6, 8, 3
CHECKPOINT_KEYS = {"step", "q", "anisotropy", "top_eigenvalues", "top_overlap_backbone", "effective_rank",
                   "grad_backbone_cos_mean", "grad_backbone_cos_std", "noise_floor", "block_signed_projection",
                   "anisotropy_se", "anisotropy_exact", "random_expected", "trace", "trace_se", "q_se",
                   "q_random_std", "q_random_se", "q_random_std_exact", "q_random_se_exact",
                   "grad_backbone_projection_mean", "grad_backbone_projection_std", "grad_backbone_projection_se",
                   "grad_backbone_cos_signed_mean", "grad_backbone_cos_signed_std", "grad_backbone_cos_se",
                   "block_projection_mean", "block_projection_std", "block_grad_norm_mean", "bootstrap"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_fisher_model()


def tiny_fisher_model():
    """(model, task, layout): a float64 GPT-2 with 2 blocks of d=4 on modular addition mod 7; trunk D = 2 x 192."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptaudit.io.roles import resolve_architecture

    task = get_task("modadd", p=7)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=task.vocab_size, n_positions=4, n_embd=4, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=8, eos_token_id=8, initializer_range=0.3)
    model = GPT2LMHeadModel(config).double().eval()
    arch = resolve_architecture({n: tuple(t.shape) for n, t in model.state_dict().items()}, config.to_dict())
    layout = trunk_layout(arch)
    return model, task, layout


def manual_flat(tensors: dict[str, torch.Tensor], n_layer: int = 2, d: int = 4) -> torch.Tensor:
    """The trunk in layout order written out by hand: per block Q, K, V columns of c_attn, c_proj, c_fc, mlp c_proj."""
    parts = []
    for b in range(n_layer):
        w = tensors[f"transformer.h.{b}.attn.c_attn.weight"]
        parts += [w[:, :d], w[:, d : 2 * d], w[:, 2 * d :]]
        parts += [tensors[f"transformer.h.{b}.{n}.weight"] for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return torch.cat([p.reshape(-1) for p in parts])


def dense_gradients(model, task, n: int = M) -> np.ndarray:
    """[n, D] gradients by plain loss.backward() on every parameter."""
    rows = []
    for p in model.parameters():
        p.requires_grad_(True)
    for i in range(n):
        model.zero_grad()
        loss, _ = task.loss_and_accuracy(model, task.batch("train", i, B, SEED))
        loss.backward()
        rows.append(manual_flat({k: p.grad for k, p in model.named_parameters()}).numpy().copy())
    model.zero_grad()
    return np.stack(rows)


def unit(rng: np.random.Generator, dim: int) -> torch.Tensor:
    v = rng.standard_normal(dim)
    return torch.from_numpy(v / np.linalg.norm(v))


@pytest.fixture(scope="module")
def analysed(tiny):
    model, task, layout = tiny
    rng = np.random.default_rng(0)
    dirs = {"backbone": unit(rng, layout.dim), "pc2": unit(rng, layout.dim)}
    settings = FisherSettings(batches=M, n_random=5, seed=SEED, keep_eigenvector=True)
    res = fisher_at_model(model, task, layout, dirs, settings, batch_size=B)
    return res, dirs, dense_gradients(model, task)


def test_layout_matches_hand_flattening(tiny):
    model, _, layout = tiny
    sd = dict(model.state_dict())
    assert layout.dim == 2 * (4 * 12 + 4 * 4 + 4 * 16 + 16 * 4)
    assert torch.equal(layout.flatten(sd), manual_flat(sd))


def test_gradient_equals_plain_autograd(tiny):
    model, task, layout = tiny
    batch = task.batch("train", 2, B, SEED)
    g, loss, _ = flat_gradient(model, task, batch, layout)
    ref = dense_gradients(model, task, n=3)[2]
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-12, atol=1e-14)


def test_rayleigh_quotients_equal_dense_fisher(analysed, tiny):
    res, dirs, G = analysed
    F = G.T @ G / M  # the D x D Fisher, formed only here
    for name in ("backbone", "pc2"):
        v = dirs[name].numpy()
        assert res.q[name] == pytest.approx(v @ F @ v, rel=1e-10)
    W = random_directions(dirs["backbone"], 5, SEED).numpy()
    expected = np.einsum("kd,de,ke->k", W, F, W)
    np.testing.assert_allclose(res.q_random, expected, rtol=1e-10)
    assert res.q["random_mean"] == pytest.approx(expected.mean(), rel=1e-10)
    assert res.anisotropy == pytest.approx(dirs["backbone"].numpy() @ F @ dirs["backbone"].numpy() / expected.mean(),
                                           rel=1e-10)


def test_exact_random_expectation_and_standard_error(analysed):
    """E q(w) over unit w orthogonal to v_b = tr(P F P) / (D - 1) with the projector P = I - v v^T, from the dense
    Fisher; the standard error of alpha from the K sampled quotients by the delta method, computed here with numpy."""
    res, dirs, G = analysed
    F = G.T @ G / M
    v = dirs["backbone"].numpy()
    P = np.eye(F.shape[0]) - np.outer(v, v)
    expected = np.trace(P @ F @ P) / (F.shape[0] - 1)
    assert res.trace == pytest.approx(np.trace(F), rel=1e-10)
    assert res.random_expected == pytest.approx(expected, rel=1e-9)
    assert res.anisotropy_exact == pytest.approx(v @ F @ v / expected, rel=1e-9)
    W = random_directions(dirs["backbone"], 5, SEED).numpy()
    q = np.einsum("kd,de,ke->k", W, F, W)
    se = (v @ F @ v / q.mean()) * (q.std(ddof=1) / np.sqrt(q.size)) / q.mean()
    assert res.anisotropy_se == pytest.approx(se, rel=1e-8)


def test_gram_eigenpairs_equal_dense_eigh(analysed):
    res, dirs, G = analysed
    lam, vecs = np.linalg.eigh(G.T @ G / M)
    lam, vecs = lam[::-1], vecs[:, ::-1]
    np.testing.assert_allclose(res.eigenvalues, lam[:M], rtol=1e-8, atol=1e-14 * lam[0])
    assert np.all(np.abs(lam[M:]) < 1e-10 * lam[0])  # the rest of the D x D spectrum is zero
    assert abs(abs(res.u1 @ vecs[:, 0]) - 1.0) < 1e-8
    assert res.top_overlap_backbone == pytest.approx(abs(vecs[:, 0] @ dirs["backbone"].numpy()), rel=1e-7)
    pos = lam[:M]
    assert res.effective_rank == pytest.approx(pos.sum() ** 2 / (pos**2).sum(), rel=1e-8)
    assert 1.0 <= res.effective_rank <= M


def test_cosines_and_block_projection_from_dense_gradients(analysed):
    res, dirs, G = analysed
    vb = dirs["backbone"].numpy()
    cos = np.abs(G @ vb) / np.linalg.norm(G, axis=1)
    assert res.grad_backbone_cos_mean == pytest.approx(cos.mean(), rel=1e-10)
    assert res.grad_backbone_cos_std == pytest.approx(cos.std(), rel=1e-10)
    assert res.noise_floor == pytest.approx(math.sqrt(2 / (math.pi * 384)))
    half = G.shape[1] // 2  # both blocks have 192 scalars, block 0 first
    for b, sl in ((0, slice(0, half)), (1, slice(half, None))):
        vl = vb[sl] / np.linalg.norm(vb[sl])
        expected = np.mean(G[:, sl] @ vl / np.linalg.norm(G[:, sl], axis=1))
        assert res.block_signed_projection[b] == pytest.approx(expected, rel=1e-10)


def test_memmap_spill_gives_the_same_numbers(tiny, analysed, tmp_path):
    model, task, layout = tiny
    res, dirs, _ = analysed
    settings = FisherSettings(batches=M, n_random=5, seed=SEED, memory_budget=1, spill_dir=str(tmp_path),
                              keep_eigenvector=True)
    spilled = fisher_at_model(model, task, layout, dirs, settings, batch_size=B)
    assert res.gradient_storage == "ram" and spilled.gradient_storage.startswith("memmap:")
    assert not Path(spilled.gradient_storage.split(":", 1)[1]).exists()  # the spill file is removed
    assert not any(tmp_path.iterdir())  # and so is the direction rows' memmap (over the budget too)
    assert spilled.q == res.q
    np.testing.assert_array_equal(spilled.eigenvalues, res.eigenvalues)
    np.testing.assert_array_equal(spilled.u1, res.u1)
    assert spilled.to_json() == res.to_json()


def test_random_directions_orthonormal_and_orthogonal_to_backbone():
    rng = np.random.default_rng(1)
    vb = unit(rng, 20_000)
    W = random_directions(vb, 10, seed=7)
    assert W.dtype == torch.float64 and W.shape == (10, 20_000)
    np.testing.assert_allclose((W @ W.T).numpy(), np.eye(10), atol=1e-10)
    assert float((W @ vb).abs().max()) < 1e-10
    assert torch.equal(W, random_directions(vb, 10, seed=7))  # seeded
    assert not torch.equal(W, random_directions(vb, 10, seed=8))


def test_noise_floor_matches_monte_carlo():
    dim, n = 800, 20_000
    x = np.random.default_rng(5).standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fixed = np.zeros(dim)
    fixed[3] = 1.0
    assert np.mean(np.abs(x @ fixed)) == pytest.approx(noise_floor(dim), rel=0.03)


class Float64Loss:
    """The modadd data with the loss kept in float64 (the task's own loss is float32, too coarse for h^2 = 1e-6)."""

    def __init__(self, task):
        self.task = task

    def batch(self, *args):
        return self.task.batch(*args)

    def loss(self, model, batch):
        logits = self.task.answer_logits(model, batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    def loss_and_accuracy(self, model, batch):
        return self.loss(model, batch), 0.0


def test_hessian_matches_finite_difference(tiny):
    model, task, layout = tiny
    task = Float64Loss(task)
    n = 3
    rng = np.random.default_rng(2)
    vb = unit(rng, layout.dim)
    rand = random_directions(vb, 2, SEED)
    settings = FisherSettings(batches=n, n_random=2, seed=SEED, hessian=True)
    res = fisher_at_model(model, task, layout, {"backbone": vb}, settings, batch_size=B)
    batches = [task.batch("train", i, B, SEED) for i in range(n)]
    params = dict(model.named_parameters())
    base = {k: p.detach().clone() for k, p in params.items()}

    def loss_at(v: torch.Tensor, h: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(base[k])
            for piece, start in zip(layout.pieces, layout.offsets, strict=True):
                piece.take(params[piece.tensor].data).add_(h * v[start : start + piece.numel].view(piece.shape))
            value = np.mean([float(task.loss_and_accuracy(model, b)[0]) for b in batches])
            for k, p in params.items():
                p.copy_(base[k])
        return value

    h = 1e-3
    for v, got in ((vb, res.hessian["backbone"]), (rand[0], res.hessian_random[0]), (rand[1], res.hessian_random[1])):
        fd = (loss_at(v, h) - 2 * loss_at(v, 0.0) + loss_at(v, -h)) / h**2
        assert got == pytest.approx(fd, rel=1e-4, abs=1e-9)
    assert res.hessian["random_mean"] == pytest.approx(float(np.mean(res.hessian_random)))


def test_fisher_is_deterministic_and_restores_the_model(tiny):
    model, task, layout = tiny
    flags = [p.requires_grad for p in model.parameters()]
    vb = unit(np.random.default_rng(4), layout.dim)
    s = FisherSettings(batches=2, n_random=2, seed=1)
    a = fisher_at_model(model, task, layout, {"backbone": vb}, s, batch_size=4)
    b = fisher_at_model(model, task, layout, {"backbone": vb}, s, batch_size=4)
    assert a.to_json() == b.to_json()
    assert [p.requires_grad for p in model.parameters()] == flags


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_with_vectors_from_backbone(tiny_run, tmp_path):
    vec = tmp_path / "v.safetensors"
    r = invoke("backbone", tiny_run, "--save-vectors", vec, "--no-report", "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "f.h5"
    r = invoke("fisher", tiny_run, "--steps", "50,60", "--vectors", vec, "--batches", 3, "--batch-size", 16,
                "--random", 3, "--switch", "30:60", "--out", out, "--json", "--no-hash")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert [c["step"] for c in s["checkpoints"]] == [50, 60]
    for c in s["checkpoints"]:
        assert set(c) == CHECKPOINT_KEYS
        assert set(c["q"]) == {"backbone", "switch", "pc2", "pc3", "pc4", "pc5", "pc6", "random_mean"}
        assert set(c["block_signed_projection"]) == {"0", "1"}
        assert len(c["top_eigenvalues"]) == 3
    assert s["stiffening"]["q_backbone"] == [c["q"]["backbone"] for c in s["checkpoints"]]
    b0 = [c["block_signed_projection"]["0"] for c in s["checkpoints"]]
    assert s["block_running_sum"]["0"] == pytest.approx(np.cumsum(b0).tolist())
    with h5py.File(out) as f:
        assert {"step_50", "step_60", "stiffening"} <= set(f["fisher"])
        assert f["fisher/step_60"].attrs["anisotropy"] == pytest.approx(s["checkpoints"][1]["anisotropy"])


def test_cli_directions_over_the_memory_budget_give_the_same_report(tiny_run, tmp_path):
    """With --memory-budget below the size of the directions, the direction rows (read tensor by tensor from the
    vectors file) and the gradients go to a disk memmap: every number of the report is the one computed in RAM,
    the report says where the rows were, and the spill directory is removed."""
    vec = tmp_path / "v.safetensors"
    assert invoke("backbone", tiny_run, "--save-vectors", vec, "--no-report", "--quiet").exit_code == 0
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("ckptaudit-fisher-*"))
    args = ["fisher", tiny_run, "--steps", "60", "--vectors", vec, "--batches", 3, "--batch-size", 8, "--random", 3,
            "--switch", "30:60", "--json", "--no-report"]
    ram = invoke(*args)
    disk = invoke(*args, "--memory-budget", "1K")
    assert ram.exit_code == 0 and disk.exit_code == 0, ram.output + disk.output
    a, b = json.loads(ram.stdout), json.loads(disk.stdout)
    assert a["settings"]["direction_storage"] == "ram" and b["settings"]["direction_storage"] == "memmap"
    assert a["checkpoints"] == b["checkpoints"] and a["direction_cosines"] == b["direction_cosines"]
    assert set(tmp.glob("ckptaudit-fisher-*")) == before


def test_cli_too_many_random_directions_is_one_line_and_leaves_no_spill(tiny_run):
    """More random directions than fit orthogonal to v_b in the analysed block (12,288 scalars) is a one-line
    error naming --random, and the direction rows already spilled to a memmap (a 1K budget) are removed."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("ckptaudit-fisher-*"))
    r = invoke("fisher", tiny_run / "checkpoint-60", "--run", tiny_run, "--block", 1, "--random", 20_000,
               "--memory-budget", "1K", "--batches", 2, "--no-report")
    assert_one_line_error(r, "--random", "12287")
    assert set(tmp.glob("ckptaudit-fisher-*")) == before


def test_cli_run_computes_vectors_on_the_fly(tiny_run):
    r = invoke("fisher", tiny_run / "checkpoint-60", "--run", tiny_run, "--batches", 2, "--batch-size", 8,
                "--random", 2, "--block", 1, "--json", "--no-report")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    (c,) = s["checkpoints"]
    assert c["step"] == 60 and set(c["block_signed_projection"]) == {"1"}
    assert s["dim"] == 32 * 96 + 32 * 32 + 32 * 128 * 2
    assert s["hessian"] is None


def test_cli_single_checkpoint_without_vectors_is_a_usage_error(tiny_run):
    r = invoke("fisher", tiny_run / "checkpoint-60", "--no-report")
    assert r.exit_code == 2
    assert "--vectors" in r.stderr


def test_include_bias_quotient_by_parameter_name(tiny):
    """With biases in the trunk, q(v) equals (1/M) sum_i <g_i, v>^2 computed parameter by parameter (full tensors,
    plain autograd), independently of the layout's order."""
    model, task, _ = tiny
    from ckptaudit.io.roles import resolve_architecture

    arch = resolve_architecture({n: tuple(t.shape) for n, t in model.state_dict().items()}, model.config.to_dict())
    layout = trunk_layout(arch, include_bias=True)
    names = [f"transformer.h.{b}.{m}.{kind}" for b in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj") for kind in ("weight", "bias")]
    params = dict(model.named_parameters())
    assert layout.dim == sum(params[n].numel() for n in names)
    g = torch.Generator().manual_seed(7)
    full = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}
    norm = math.sqrt(sum(float((t * t).sum()) for t in full.values()))
    v = layout.flatten(full) / norm
    settings = FisherSettings(batches=M, n_random=2, seed=SEED)
    res = fisher_at_model(model, task, layout, {"backbone": v}, settings, batch_size=B)
    dots = []
    for i in range(M):
        model.zero_grad()
        loss, _ = task.loss_and_accuracy(model, task.batch("train", i, B, SEED))
        loss.backward()
        dots.append(sum(float((params[n].grad * full[n]).sum()) for n in names) / norm)
    model.zero_grad()
    assert res.q["backbone"] == pytest.approx(float(np.mean(np.square(dots))), rel=1e-10)


def test_cli_include_bias_uses_the_bias_entries_of_the_vectors(tiny_run, tmp_path):
    """backbone --include-bias writes bias entries; fisher --include-bias measures in the larger trunk (its noise
    floor is that of the larger D), and without it the same file still serves the weights-only trunk."""
    vec = tmp_path / "v.safetensors"
    assert invoke("backbone", tiny_run, "--include-bias", "--save-vectors", vec, "--no-report", "--quiet").exit_code == 0
    docs = {}
    for flag in ([], ["--include-bias"]):
        r = invoke("fisher", tiny_run, "--steps", "60", "--vectors", vec, "--batches", 2, "--batch-size", 8,
                    "--random", 2, "--json", "--no-report", *flag)
        assert r.exit_code == 0, r.output
        docs[bool(flag)] = json.loads(r.stdout)
    assert docs[True]["settings"]["include_bias"] is True and docs[False]["settings"]["include_bias"] is False
    # trunk of the tiny run: 2 blocks of d = 32; the biases add 3d + d + 4d + d scalars per block
    assert docs[True]["dim"] - docs[False]["dim"] == 2 * 9 * 32
    nf = docs[True]["checkpoints"][0]["noise_floor"]
    assert nf == pytest.approx(math.sqrt(2 / (math.pi * docs[True]["dim"])))


def test_cli_include_bias_with_weights_only_vectors_names_the_fix(tiny_run, tmp_path):
    from cli_helpers import assert_one_line_error

    vec = tmp_path / "v.safetensors"
    assert invoke("backbone", tiny_run, "--save-vectors", vec, "--no-report", "--quiet").exit_code == 0
    r = invoke("fisher", tiny_run, "--steps", "60", "--vectors", vec, "--include-bias", "--batches", 2, "--no-report")
    assert_one_line_error(r, str(vec), "c_attn.bias", "--include-bias")


def test_probes_hold_the_named_directions_bit_for_bit_and_consume_them(tiny):
    """prepare_probes(consume=True) moves each named direction into its row of the probe rows (the caller's dict
    ends empty), unchanged to the last bit, with "backbone" first; the per-block v_b^(l)
    are each block's own backbone where given, else the trunk's v_b on the block, unit on the segment (numpy)."""
    from ckptaudit.analyses.fisher.run import prepare_probes

    _, _, layout = tiny
    gen = torch.Generator().manual_seed(11)
    raw = {n: torch.randn(layout.dim, generator=gen, dtype=torch.float64) for n in ("pc2", "backbone", "pc3")}
    unit = {n: v / torch.linalg.vector_norm(v) for n, v in raw.items()}
    own = torch.randn(layout.dim, generator=gen, dtype=torch.float64)
    (lo0, hi0), (lo1, hi1) = layout.block_ranges.values()
    own[lo1:hi1] = 0  # block 1 has no backbone of its own
    moved = dict(unit)
    got = prepare_probes(layout, moved, 5, SEED, block_backbone=own, consume=True)
    assert moved == {} and got.names == ("backbone", "pc2", "pc3") and got.n_random == 5
    for name in got.names:
        assert torch.equal(got.rows.row(name), unit[name])
    vb, ob = unit["backbone"].numpy(), own.numpy()
    np.testing.assert_allclose(got.vb_blocks[lo0:hi0].numpy(), ob[lo0:hi0] / np.linalg.norm(ob[lo0:hi0]), rtol=1e-15)
    np.testing.assert_allclose(got.vb_blocks[lo1:hi1].numpy(), vb[lo1:hi1] / np.linalg.norm(vb[lo1:hi1]), rtol=1e-15)


def test_random_directions_are_the_gram_schmidt_of_their_seeded_draws():
    """The random directions are the Q of numpy's QR factorisation of [v_b, z_1, ..., z_K] (Gram-Schmidt of the
    seeded Gaussian draws against v_b and each other), the first k of them do not depend on K (to rounding), any column range
    of the draws is the same alone as in the whole, and the projections of gradients computed from G Z^T, G v_b and
    the K x K factors (what fisher does, never holding W) equal G W^T."""
    from ckptaudit.analyses.fisher.directions import RANDOM_BLOCK, RandomDirections

    rng = np.random.default_rng(3)
    dim = 2 * RANDOM_BLOCK + 123  # three draw blocks, the last one short
    vb = torch.from_numpy(rng.standard_normal(dim) * 3.0)  # not unit: normalised inside
    rd = RandomDirections(vb, 6, seed=9)
    Z = rd.draws(0, dim)
    v = vb.numpy() / np.linalg.norm(vb.numpy())
    Q, R = np.linalg.qr(np.column_stack([v, Z.T]))
    Q = Q * np.sign(np.diag(R))
    W = random_directions(vb, 6, seed=9).numpy()
    np.testing.assert_allclose(W, Q[:, 1:].T, atol=1e-14)
    np.testing.assert_allclose(random_directions(vb, 3, seed=9).numpy(), W[:3], rtol=1e-12, atol=1e-16)
    lo, hi = RANDOM_BLOCK - 7, 2 * RANDOM_BLOCK + 5
    np.testing.assert_array_equal(rd.draws(lo, hi), Z[:, lo:hi])
    G = rng.standard_normal((4, dim))
    np.testing.assert_allclose(rd.project(G @ Z.T, G @ vb.numpy()), G @ W.T, rtol=1e-10, atol=1e-12)


def test_random_directions_are_never_held_whole(tmp_path):
    """Setting up K = 10 random directions of D = 4M and projecting gradients on them (one pass of the gradient
    store with the draws as the right-hand factor) raises the process's peak memory by far less than the 320 MB
    a [K, D] float64 matrix takes (peak RSS of a fresh process, measured before and after)."""
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent("""
        import resource, numpy as np, torch
        from ckptaudit.analyses.fisher.directions import RANDOM_BLOCK, RandomDirections
        from ckptaudit.analyses.fisher.store import GradientStore
        D, K = 4_000_000, 10
        v = torch.ones(D, dtype=torch.float64)
        store = GradientStore(2, D, np.float32, 1 << 30)
        store.append(torch.ones(D)); store.append(torch.full((D,), 2.0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rd = RandomDirections(v, K, 0)
        gz = torch.zeros(2, K, dtype=torch.float64)
        visit = lambda lo, hi, c: gz.add_(c @ torch.from_numpy(rd.draws(lo, hi)).T)
        store.gram(chunk_elems=1 << 20, visit=visit, align=RANDOM_BLOCK)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024, rd.project(gz.numpy(), np.array([D ** 0.5, 2 * D ** 0.5])).shape)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout.split()
    grown = int(out[0])
    assert grown < 10 * 4_000_000 * 8 / 4, f"peak memory grew by {grown / 1e6:.0f} MB"
    assert out[1:] == ["(2,", "10)"]
