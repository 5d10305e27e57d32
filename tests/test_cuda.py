"""The CUDA path: the same independent references as the CPU tests, and every command's numbers against its CPU run.

Runs only where torch sees a GPU. CI has none, so there these tests are skipped and the CPU path is the tested
default; benchmarks/RESULTS.md records the runs of the whole suite on a GPU machine. Set
CKPTAUDIT_TEST_SECOND_DEVICE=cpu to run the CPU-against-second-device comparisons on a machine without a GPU
(the comparator itself is then checked against a run that must agree to the last digit). Without either, the
comparator still runs on CPU against CPU for the commands that take seconds (test_comparator_*), so that the
command lines here stay in step with the CLI.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import runs
import torch
from cli_helpers import invoke
from conftest import fixture_run, make_tiny_lm_dir

SECOND = os.environ.get("CKPTAUDIT_TEST_SECOND_DEVICE", "cuda")
needs_second = pytest.mark.skipif(SECOND.startswith("cuda") and not torch.cuda.is_available(),
                                  reason="no CUDA device (the CPU path is tested everywhere else)")


def _rtol(rtol: float, second: str) -> float:
    """The tolerance of a comparison with ``second``: two CPU runs of one command agree to the last digit."""
    return rtol if second.startswith("cuda") else 0.0

# Keys whose values legitimately differ between two runs of one analysis: where (device, gradient storage) and
# how long it ran.
VOLATILE = ("device", "storage", "seconds", "elapsed", "time", "created", "path", "hash", "version", "report")


def _numeric_close(a, b, rtol: float, where: str) -> None:
    """``a`` and ``b`` (a number or a list of numbers) equal within rtol, relative to the largest magnitude."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    assert x.shape == y.shape, f"{where}: shapes {x.shape} and {y.shape}"
    assert np.array_equal(np.isfinite(x), np.isfinite(y)), f"{where}: non-finite entries differ"
    fin = np.isfinite(x)
    scale = max(float(np.abs(y[fin]).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(x[fin], y[fin], rtol=rtol, atol=rtol * scale, err_msg=where)


def assert_same_results(a, b, rtol: float, where: str = "") -> None:
    """Two JSON documents of one analysis agree: numbers within rtol, everything else exactly; VOLATILE keys skipped."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            if not any(v in k.lower() for v in VOLATILE):
                assert_same_results(a[k], b[k], rtol, f"{where}/{k}")
        return
    if isinstance(a, list) and a and all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None
                                         for v in a):
        if any(v is None for v in a):
            assert [v is None for v in a] == [v is None for v in b], f"{where}: missing values differ"
            a = [v for v in a if v is not None]
            b = [v for v in b if v is not None]
        _numeric_close(a, b, rtol, where)
        return
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same_results(u, v, rtol, f"{where}[{i}]")
        return
    if isinstance(a, float) and not isinstance(b, bool):
        _numeric_close(a, b, rtol, where)
        return
    assert a == b, f"{where}: {a!r} vs {b!r}"


def _json(args: list[str], device: str) -> dict:
    r = invoke(*args, "--device", device, "--json", "--no-report")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------------------------ references


def _helpers():
    import test_backbone as bb
    import test_gram as gr

    return bb, gr


@needs_second
def test_backbone_on_the_gpu_matches_brute_force_svd(tmp_path):
    from ckptaudit.analyses.backbone.run import run_backbone

    bb, gr = _helpers()
    d, n = bb.D_MODEL, bb.LAYERS
    run = runs.make_run(tmp_path, runs.random_trajectory(runs.gpt2_shapes(d, n), len(bb.STEPS), seed=7, noise=0.04),
                      bb.STEPS, runs.gpt2_config(d, n))
    sw = [(60, 85), (110, 150)]
    rep = run_backbone(run, window=bb.W, switches=sw, device=SECOND, chunk_elems=100)
    parts = gr.reference_parts(d, n)
    for name, res in {"trunk": rep.trunk, "block_0": rep.blocks[0], "group_S": rep.groups["S"]}.items():
        bb.check(res, bb.brute(gr.stacked(run, parts[name]), bb.STEPS[1:], 0, bb.W, sw))


@needs_second
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_are_widened_on_the_gpu_without_rounding(tmp_path, dtype):
    """Stored half-precision rows are widened on the device and subtracted in float64: the Grams equal numpy's."""
    from ckptaudit.analyses.backbone.run import run_backbone

    bb, gr = _helpers()
    steps = bb.STEPS[:8]
    run = runs.make_run(tmp_path, runs.random_trajectory(runs.gpt2_shapes(bb.D_MODEL, 1), len(steps), seed=2), steps,
                      runs.gpt2_config(bb.D_MODEL, 1), dtype=dtype, shards=2)
    rep = run_backbone(run, window=3, device=SECOND, chunk_elems=50)
    X = gr.stacked(run, gr.reference_parts(bb.D_MODEL, 1)["trunk"])  # the stored values, upcast
    bb.check(rep.trunk, bb.brute(X, steps[1:], 0, 3))


@needs_second
def test_fisher_on_the_gpu_matches_the_dense_fisher():
    from test_fisher import SEED, B, M, dense_gradients, tiny_fisher_model, unit

    from ckptaudit.analyses.fisher.run import FisherSettings, fisher_at_model

    model, task, layout = tiny_fisher_model()
    G = dense_gradients(model, task)  # on the CPU, by plain loss.backward()
    F = G.T @ G / M
    rng = np.random.default_rng(0)
    dirs = {"backbone": unit(rng, layout.dim), "pc2": unit(rng, layout.dim)}
    settings = FisherSettings(batches=M, n_random=5, seed=SEED, keep_eigenvector=True, device=SECOND)
    res = fisher_at_model(model.to(SECOND), task, layout, dirs, settings, batch_size=B)
    for name in ("backbone", "pc2"):
        v = dirs[name].numpy()
        assert math.isclose(res.q[name], v @ F @ v, rel_tol=1e-9)
    lam = np.linalg.eigvalsh(F)[::-1]
    np.testing.assert_allclose(res.eigenvalues, lam[:M], rtol=1e-8, atol=1e-14 * lam[0])
    cos = np.abs(G @ dirs["backbone"].numpy()) / np.linalg.norm(G, axis=1)
    assert math.isclose(res.grad_backbone_cos_mean, cos.mean(), rel_tol=1e-9)


@needs_second
def test_exact_overlaps_on_the_gpu_match_brute_force():
    from ckptaudit.analyses.embeddings.run import overlap_stats

    g = torch.Generator().manual_seed(1)
    E = torch.randn(300, 16, generator=g)
    R = E.double() / E.double().norm(dim=1, keepdim=True)
    c = (R @ R.T)[tuple(torch.triu_indices(300, 300, 1))].numpy()
    r = overlap_stats(E, exact=True, tile=64, bins=4096, device=SECOND)
    assert r.pairs == c.size
    assert r.mean_c == pytest.approx(c.mean(), abs=1e-7)
    assert r.mean_c2 == pytest.approx((c * c).mean(), rel=1e-5)
    assert r.frac_abs_c_gt_0_3 == np.count_nonzero(np.abs(c) > 0.3) / c.size
    assert int(r.hist_c.sum()) == c.size


# ------------------------------------------------------------------------------------------------ CPU against GPU


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    words = ["<unk>", "the", "old", "man", "felt", "a", "deep", "longing", "yearning", "joy", "relief", "for", "home"]
    return make_tiny_lm_dir(tmp_path_factory.mktemp("cuda") / "lm", {w: i for i, w in enumerate(words)}, unk="<unk>")


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ctx") / "c.jsonl"
    p.write_text(json.dumps({"context": "the old man felt a deep", "target": "longing", "competitor": "yearning"})
                 + "\n" + json.dumps({"context": "the old man felt", "target": "joy"}) + "\n")
    return p


# (command line with {run}/{lm}/{ctx} placeholders, relative tolerance). Float64 analyses agree to the last
# digits; analyses that run a float32 model differ by float32 rounding (GPU kernels sum in another order).
COMMANDS = [
    ("backbone {run}", 1e-9),
    ("fisher {run} --batches 8", 2e-3),
    ("resume-probe {run}/checkpoint-30 --train-steps 3", 2e-3),
    ("gxs velocity {run}", 2e-3),
    ("gxs slack {run}/checkpoint-60 --alpha 1,0.5 --sigma 0,1", 2e-3),
    ("gxs transplant {run}/checkpoint-60 {run}/checkpoint-30", 2e-3),
    ("extrapolate {run}", 2e-3),
    ("regimes {run}", 2e-3),
    ("classify-embeddings {lm} --exact --tile 64", 1e-5),
    ("born-gap {lm} --contexts {ctx}", 1e-4),
    ("finetune-probe {lm} --contexts {ctx} --mode full --train-steps 3 --lr 1e-2 --seed 1", 2e-3),
]


@needs_second
@pytest.mark.parametrize(("line", "rtol"), COMMANDS, ids=[c[0].split(" {")[0] for c in COMMANDS])
def test_command_on_the_gpu_reports_the_cpu_numbers(line, rtol, tiny_run, lm_dir, contexts):
    args = line.format(run=tiny_run, lm=lm_dir, ctx=contexts).split()
    cpu, gpu = _json(args, "cpu"), _json(args, SECOND)
    assert_same_results(gpu, cpu, _rtol(rtol, SECOND), args[0])


def _gate_statuses(run: Path, tmp_path: Path, devices: tuple[str, str]) -> list[list[tuple[str, str]]]:
    """(check, status) of ``gate --init``'s policy on ``run``, once per device."""
    policy = tmp_path / "policy.toml"
    assert invoke("gate", "--init", str(policy), "--force").exit_code == 0
    out = []
    for i, dev in enumerate(devices):
        path = tmp_path / f"{i}-{dev}.json"
        r = invoke("gate", str(run), "--policy", str(policy), "--device", dev, "--no-report", "--no-hash",
                   "--json-out", str(path))
        assert r.exit_code in (0, 1), r.output
        out.append([(c["name"], c["status"]) for c in json.loads(path.read_text())["checks"]])
    return out


@needs_second
def test_gate_on_the_gpu_passes_the_same_checks(tiny_run, tmp_path):
    cpu, gpu = _gate_statuses(tiny_run, tmp_path, ("cpu", SECOND))
    assert gpu == cpu


@needs_second
def test_auto_device_is_the_gpu_and_the_report_says_so(tiny_run, tmp_path):
    if not SECOND.startswith("cuda"):
        pytest.skip("needs a GPU")
    import h5py

    out = tmp_path / "b.h5"
    r = invoke("backbone", str(tiny_run), "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert f.attrs["device"].startswith("cuda")


@needs_second
def test_cross_seed_on_the_gpu_reports_the_cpu_numbers(tmp_path):
    runs = [str(fixture_run("seeds") / s) for s in ("seed0", "seed1")]
    cpu, gpu = (_json(["cross-seed", *runs], d) for d in ("cpu", SECOND))
    assert_same_results(gpu, cpu, _rtol(2e-3, SECOND), "cross-seed")


@needs_second
def test_nccl_collectives_carry_gpu_tensors(tmp_path):
    """DistContext's all_reduce / gather / broadcast through nccl (a one-process group: this machine may have one GPU)."""
    if not SECOND.startswith("cuda"):
        pytest.skip("needs a GPU")
    import torch.distributed as dist

    from ckptaudit.analyses.distributed import DistContext

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    try:
        ctx = DistContext(rank=0, world_size=1, local_rank=0, backend="nccl", device="cuda:0")
        a = np.random.default_rng(0).standard_normal((3, 5))
        assert np.array_equal(ctx.all_reduce_sum(a), a)
        (g,) = ctx.gather(a.astype(np.float32))
        assert g.dtype == np.float32 and np.array_equal(g, a.astype(np.float32))
        assert np.array_equal(ctx.broadcast(np.arange(7, dtype=np.int64)), np.arange(7))
        ctx.barrier()
    finally:
        dist.destroy_process_group()


@needs_second
def test_more_ranks_than_gpus_is_a_one_line_error(tiny_run, tmp_path):
    if not SECOND.startswith("cuda"):
        pytest.skip("needs a GPU")
    import subprocess
    import sys

    from distributed_helpers import clean_env

    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n + 1}", "-m",
           "ckptaudit", "backbone", str(tiny_run), "--device", "cuda", "--no-report", "--quiet"]
    p = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if "ckptaudit: error:" in ln]
    assert lines and f"needs cuda:{n}" in lines[0] and f"--nproc-per-node {n}" in lines[0], p.stderr[-2000:]
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- CPU against CPU

# The commands of COMMANDS that take a few seconds on a CPU: the comparator runs on them in every suite.
CHEAP = ("backbone", "gxs velocity", "classify-embeddings", "born-gap", "finetune-probe")


@pytest.mark.parametrize("line", [c[0] for c in COMMANDS], ids=[c[0].split(" {")[0] for c in COMMANDS])
def test_every_comparison_line_is_a_valid_command_line(line, tiny_run, lm_dir, contexts):
    """Every command line of the comparison, with the options _json adds, parses (--help after them: click rejects
    an unknown option before it prints the help), so the lines stay valid where no GPU runs them."""
    args = line.format(run=tiny_run, lm=lm_dir, ctx=contexts).split()
    r = invoke(*args, "--device", "cpu", "--json", "--no-report", "--help")
    assert r.exit_code == 0, (args, r.output)
    assert invoke(*args, "--no-such-option", "--help").exit_code == 2  # the check can fail


def _moved(doc, factor: float = 1.0 + 1e-6):
    """``doc`` with its first finite non-zero number (depth first) times ``factor``, and whether one was found."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if not any(x in k.lower() for x in VOLATILE):
                new, done = _moved(v, factor)
                if done:
                    return {**doc, k: new}, True
        return doc, False
    if isinstance(doc, list):
        for i, v in enumerate(doc):
            new, done = _moved(v, factor)
            if done:
                return [*doc[:i], new, *doc[i + 1:]], True
        return doc, False
    if isinstance(doc, float) and math.isfinite(doc) and doc != 0.0:
        return doc * factor, True
    return doc, False


@pytest.mark.parametrize(("line", "rtol"), [c for c in COMMANDS if c[0].split(" {")[0] in CHEAP],
                         ids=[c[0].split(" {")[0] for c in COMMANDS if c[0].split(" {")[0] in CHEAP])
def test_comparator_on_cpu_against_cpu(line, rtol, tiny_run, lm_dir, contexts):
    """Each command line of the GPU comparison runs as written, twice on the CPU with the same seed: the runs agree
    to the last digit, and the comparator tells apart a document with one number moved by 1e-6 (relative)."""
    args = line.format(run=tiny_run, lm=lm_dir, ctx=contexts).split()
    first, second = _json(args, "cpu"), _json(args, "cpu")
    assert_same_results(second, first, 0.0, args[0])
    moved, found = _moved(first)
    assert found, args[0]
    with pytest.raises(AssertionError):
        assert_same_results(moved, first, 1e-9, args[0])


def test_comparator_gate_on_cpu_against_cpu(tiny_run, tmp_path):
    a, b = _gate_statuses(tiny_run, tmp_path, ("cpu", "cpu"))
    assert a == b and a and {name for name, _ in a} >= {"provenance", "finite"}
