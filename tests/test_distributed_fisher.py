"""Several processes: `torchrun --nproc-per-node 2 -m ckptaudit fisher` (gloo, CPU) against one process.

Rank r takes mini-batches r, r + 2, ...; the distributed run must report every number of the single-process run (to
1e-10 relative), write exactly one report and print one JSON document. The backbone is computed on the fly by the
distributed backbone pass and its vectors file copied from rank 0 to rank 1. An odd batch count gives the ranks
unequal shares; that case also takes Hessian-vector products and spills the gradients to a memmap.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import compare_numbers, run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _fisher(cwd: Path, run: Path, nproc: int, extra: list[str]) -> subprocess.CompletedProcess:
    # torchrun's own parser rejects "--run" anywhere on its command line (an ambiguous prefix of its --run-path),
    # so the distributed side spells the same option --backbone-run.
    run_opt = "--run" if nproc == 1 else "--backbone-run"
    args = ["fisher", str(run), "--steps", "60", run_opt, str(run), "--json", "--out", "report.h5", "--no-hash",
            "--device", "cpu", *extra]
    return run_cli(cwd, args, nproc, timeout=180)


@pytest.mark.parametrize(
    ("batches", "extra"),
    [(8, []), (7, ["--hessian", "--random", "3", "--memory-budget", "1K"])],
    ids=["even-shares", "odd-shares-hessian-memmap"],
)
@pytest.mark.slow
def test_two_process_gloo_fisher_equals_single_process(tiny_run, tmp_path, batches, extra):
    extra = ["--batches", str(batches), *extra]
    single = _fisher(tmp_path / "single", tiny_run, 1, extra)
    dist = _fisher(tmp_path / "dist", tiny_run, 2, extra)
    ref, got = json.loads(single.stdout), json.loads(dist.stdout)  # one JSON document: rank 1 printed nothing
    # the vectors file computed on the fly lives in each run's own temporary directory
    assert Path(ref["settings"].pop("vectors")).name == Path(got["settings"].pop("vectors")).name
    for key in ("timing_seconds", "threads"):  # measurements of each run (torchrun sets one thread per rank)
        assert key in ref["settings"] and key in got["settings"]
        ref["settings"].pop(key), got["settings"].pop(key)
    assert ref["settings"]["batches"] == batches
    assert (ref["hessian"] is not None) == ("--hessian" in extra)
    assert ref["settings"]["gradient_storage"] == (["memmap"] if "--memory-budget" in extra else ["ram"])
    assert compare_numbers(ref, got) > 30
    # exactly one report, from rank 0
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["report.h5"]
    import h5py

    keys = ["projections", "eigenvalues", "grad_norms", "losses", "q_random", "block_signed_projection", "gram",
            "block_projections", "block_grad_norms", "bootstrap/replicates/anisotropy", "bootstrap/replicates/lambda_1"]
    if "--hessian" in extra:
        keys.append("hessian_random")
    with h5py.File(tmp_path / "single" / "report.h5") as f1, h5py.File(tmp_path / "dist" / "report.h5") as f2:
        for key in keys:
            a, b = f1[f"fisher/step_60/{key}"][()], f2[f"fisher/step_60/{key}"][()]
            assert a.shape == b.shape and a.size > 0, key
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=0, err_msg=key)
        assert f1["fisher/step_60/projections"].shape[0] == batches  # every batch, in batch order


def test_gradient_store_gathered_gram_and_combine_match_one_store():
    """GradientStore.gram_gathered / combine(reduce=...) against one store, with a fake two-rank context that
    passes the rows of both ranks in one process (the collectives are stand-ins; the row bookkeeping is real)."""
    from ckptaudit.analyses.fisher.run import GradientStore

    rng = np.random.default_rng(0)
    M, D = 5, 37
    G = rng.standard_normal((M, D)).astype(np.float32)
    whole = GradientStore(M, D, np.float32, 1 << 30)
    for g in G:
        whole.append(torch.from_numpy(g))
    stores = []
    for r in range(2):
        s = GradientStore(len(range(r, M, 2)), D, np.float32, 1 << 30)
        for g in G[r::2]:
            s.append(torch.from_numpy(g))
        stores.append(s)

    class Fake:
        world_size = 2

        def __init__(self, rank):
            self.rank, self.is_main = rank, rank == 0

    # rank 1's gather contributions first (collected), then rank 0 assembles them
    ctx1, ctx0 = Fake(1), Fake(0)
    sent: list[np.ndarray] = []
    ctx1.gather = lambda part: sent.append(part.copy())  # type: ignore[attr-defined]
    R = torch.from_numpy(rng.standard_normal((3, D)))  # another factor, met column chunk by column chunk

    def visitor(acc: list[torch.Tensor]):
        return lambda lo, hi, c: acc.append(c @ R[:, lo:hi].T)

    seen1: list[torch.Tensor] = []
    assert stores[1].gram_gathered(ctx1, M, chunk_elems=40, visit=visitor(seen1)) is None
    it = iter(sent)
    ctx0.gather = lambda part: [part, next(it)]  # type: ignore[attr-defined]
    seen0: list[torch.Tensor] = []
    gram = stores[0].gram_gathered(ctx0, M, chunk_elems=40, visit=visitor(seen0))
    seen: list[torch.Tensor] = []
    np.testing.assert_array_equal(gram, whole.gram(chunk_elems=40, visit=visitor(seen)))
    G64 = G.astype(np.float64)
    np.testing.assert_allclose(gram, G64 @ G64.T, rtol=1e-12)
    R64 = R.numpy()
    np.testing.assert_allclose(sum(seen).numpy(), G64 @ R64.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum(seen0).numpy(), G64[0::2] @ R64.T, rtol=1e-12, atol=1e-12)  # each rank: own rows
    np.testing.assert_allclose(sum(seen1).numpy(), G64[1::2] @ R64.T, rtol=1e-12, atol=1e-12)

    a = rng.standard_normal(M)
    parts = [stores[r].combine(a[r::2], chunk_elems=40, rows=M) for r in range(2)]
    np.testing.assert_allclose(parts[0] + parts[1], whole.combine(a, chunk_elems=40), rtol=1e-12, atol=1e-12)
    for s in (whole, *stores):
        s.close()
