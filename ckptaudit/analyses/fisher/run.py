"""`fisher`: empirical-Fisher Rayleigh quotients along trajectory directions, streaming (SPEC §2; paper 001 §4.5, §9.4).

At a checkpoint, M mini-batch gradients g_i (D scalars: the trunk, or one block, in :class:`TrunkLayout` order) of
the model's training loss are taken one at a time and kept (in RAM within the memory budget, else in a disk
memmap; never approximated). One pass over their columns then forms the M x M Gram G G^T, whose eigenpairs
(s_j, a_j) give the Fisher's nonzero eigenvalues s_j / M and its top eigenvector u_1 = G^T a_1 / ||G^T a_1||, and
on the way every projection <g_i, v> (float64), so q(v) = (1/M) sum_i <g_i, v>^2 never needs the D x D Fisher
F = (1/M) G^T G.

Definitions (reported by :class:`FisherCheckpoint`):
- anisotropy alpha = q(v_b) / mean_k q(w_k), w_k random unit directions orthogonal to v_b and to each other, with its
  standard error from the spread of the K quotients (delta method), and beside it the exact expectation
  E q(w) = (tr F - q(v_b)) / (D - 1) over unit w uniform on the sphere orthogonal to v_b (tr F = (1/M) sum ||g_i||^2)
  and alpha_exact = q(v_b) / E q(w), free of the sampling noise of the K directions;
- effective rank = (sum_j s_j)^2 / sum_j s_j^2 over all M Gram eigenvalues (participation ratio; between 1 and M);
- gradient-backbone cosine: mean and std (population) over batches of |<g_i, v_b>| / ||g_i||, beside the noise floor
  sqrt(2 / (pi D)) = E|cos| between a fixed vector and a random direction for large D;
- block signed projection b_l = mean_i <g_{i,l}, v_b^(l)> / ||g_{i,l}||, v_b^(l) = block l's part of v_b, unit;
- with ``hessian``: c(v) = (1/M) sum_i v^T H_i v by Hessian-vector products (double backward) on the same batches;
- the Fisher trace tr F, the signed projections <g_i, v_b> (mean, std), the raw block projections
  <g_{i,l}, v_b^(l)>, the spread of the random quotients with its exact counterpart, the standard errors over
  batches and a seeded bootstrap over batches: :mod:`ckptaudit.analyses.fisher.uncertainty`.

Gradients are taken in eval mode (dropout off) so they are a deterministic function of the weights, the batches
and the seed.

Memory: the named directions (v_b, PC2..PC6, the switch) and the per-block v_b^(l) are float64 rows read tensor
by tensor from the vectors (:func:`direction_rows`), each held once, in RAM within a budget the size of the
gradients' and else in a disk memmap. The K random directions are never held: they are the Gram-Schmidt
orthonormalisation of seeded Gaussian draws rebuilt block by block (:class:`RandomDirections`), whose projections
follow from G Z^T and K x K factors (``--hessian`` alone builds every direction whole, for its Hessian-vector
products). So beyond the model and its gradient, what fisher holds is one column chunk of each factor.

Several processes: when a torch.distributed process group with more than one rank is initialised (see
:mod:`ckptaudit.analyses.distributed`; the CLI starts one under torchrun), rank r of W takes batches r, r + W, ...
(batch i holds the same data as in one process) and keeps only those gradients, within the memory budget of each
rank. The per-batch scalars (dot products, norms, block cosines, losses, curvatures) are summed over ranks into the
full ``[M, ...]`` arrays, which is exact (every row comes from one rank, the others add zeros). For the Gram, rank 0
gathers the rows of every rank one column chunk at a time, in batch order, so each chunk and its float64 product
are the single-process ones; its eigenpairs and the Gram go to every rank, and u_1 = G^T a_1 is the sum of each rank's partial
G_r^T a_1, chunk by chunk. Every rank then holds the same result; the CLI writes rank 0's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.fisher.directions import (
    RANDOM_BLOCK,
    DirectionRows,
    RandomDirections,
    TrunkLayout,
    direction_rows,
    switch_direction,
    tensor_rows,
    trunk_layout,
)
from ckptaudit.analyses.fisher.results import FisherCheckpoint, FisherReport, noise_floor
from ckptaudit.analyses.fisher.store import GradientStore
from ckptaudit.analyses.fisher.uncertainty import DEFAULT_BOOTSTRAP, batch_bootstrap
from ckptaudit.errors import LayoutError, UsageError
from ckptaudit.io.types import RunLike, StoredCheckpoint
from ckptaudit.io.vectors import MemoryVectorSink

__all__ = ["FisherCheckpoint", "FisherReport", "FisherSettings", "GradientStore", "Probes", "fisher_at_model",
           "flat_gradient", "noise_floor", "prepare_probes", "run_fisher", "trunk_layout"]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
DEFAULT_BATCHES = 32


@dataclass(frozen=True)
class FisherSettings:
    """What to compute. ``batch_size`` None -> the checkpoint's recorded training batch size, else 32.

    memory_budget: bytes the M stored gradients may take in RAM before they go to a memmap in ``spill_dir``
    (None -> the system temp dir); the rows of the named directions have a budget of the same size. top: how many Fisher eigenvalues to report. keep_eigenvector: keep u_1 (D
    float64) in the result. bootstrap: replicates of the seeded bootstrap over batches (0 or 1: none).
    """

    batches: int = DEFAULT_BATCHES
    batch_size: int | None = None
    n_random: int = 10
    block: int | None = None
    include_bias: bool = False
    hessian: bool = False
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    seed: int = 0
    top: int = 10
    device: str = "cpu"
    spill_dir: str | None = None
    keep_eigenvector: bool = False
    chunk_elems: int = 1 << 24
    bootstrap: int = DEFAULT_BOOTSTRAP


# ------------------------------------------------------------------------------------------- one checkpoint


def _params_of(model: torch.nn.Module, layout: TrunkLayout) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in layout.tensors if n not in params]
    if missing:
        raise LayoutError(f"the model has no parameter(s) {', '.join(missing[:5])} for the trunk tensors",
                          hint="the checkpoint's config.json and weights disagree")
    return {n: params[n] for n in layout.tensors}


def flat_gradient(model: torch.nn.Module, data: Any, batch: Mapping[str, torch.Tensor], layout: TrunkLayout,
                  create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(g ``[D]`` in layout order, the loss, the per-tensor gradients) of ``data.loss`` on ``batch``.

    Only the trunk tensors are differentiated (autograd.grad, so ``.grad`` fields are untouched); with
    ``create_graph`` the gradients stay differentiable for Hessian-vector products (the batch is then taken whole).
    Otherwise a batch too large for memory is differentiated in micro-batches (tasks.data.loss_parts) whose
    gradients are summed: the batch's gradient, one micro-batch's activations alive at a time.
    """
    from ckptaudit.tasks.data import loss_parts

    params = _params_of(model, layout)
    if create_graph:
        loss = data.loss(model, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    else:
        loss, acc = None, None
        for part in loss_parts(data, model, batch):
            got = torch.autograd.grad(part, list(params.values()))
            acc = got if acc is None else tuple(a.add_(b) for a, b in zip(acc, got, strict=True))
            loss = part.detach() if loss is None else loss + part.detach()
            del part, got
        grads = acc
    by_name = dict(zip(params, grads, strict=True))
    g = layout.flatten({n: (t if create_graph else t.detach()) for n, t in by_name.items()})
    return (g.detach() if create_graph else g), loss, grads


def _sum_over_ranks(ctx: Any, *arrays: np.ndarray | None) -> tuple[np.ndarray | None, ...]:
    """The element-wise sums over ranks of float64 ``arrays`` (None passes through), in one all_reduce."""
    present = [a for a in arrays if a is not None]
    total = ctx.all_reduce_sum(np.concatenate([a.reshape(-1) for a in present]))
    out, pos = [], 0
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        out.append(total[pos : pos + a.size].reshape(a.shape).copy())
        pos += a.size
    return tuple(out)


def _gradient_dtype(params: Any) -> np.dtype:
    """The numpy dtype :func:`flat_gradient`'s vector is stored in: the promoted parameter dtype, float32 for
    half precision (numpy has no bfloat16; float32 holds fp16/bf16 exactly)."""
    dt = None
    for p in params:
        dt = p.dtype if dt is None else torch.promote_types(dt, p.dtype)
    if dt not in (torch.float32, torch.float64):
        dt = torch.float32
    return np.dtype(str(dt).replace("torch.", ""))


def _eig_desc(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, a = np.linalg.eigh(gram)
    order = np.argsort(s)[::-1]
    return np.clip(s[order], 0.0, None), a[:, order]


@dataclass(frozen=True, eq=False)
class Probes:
    """The directions of the analysis: ``rows``, the named ones (:class:`DirectionRows`: float64 rows held once,
    in RAM within the memory budget, else a disk memmap, on the CPU whatever the device, and the per-block v_b^(l));
    ``random``, the K random ones, never held (:class:`RandomDirections`). The gradients are projected on both in
    the pass over the stored gradients that forms the Gram, one column chunk at a time on the analysis device.
    ``close()`` removes a memmap."""

    rows: DirectionRows
    random: RandomDirections

    @property
    def names(self) -> tuple[str, ...]:
        return self.rows.names

    @property
    def vb_blocks(self) -> torch.Tensor:
        return self.rows.vb_blocks

    @property
    def n_random(self) -> int:
        return self.random.k

    def close(self) -> None:
        self.rows.close()

    def __enter__(self) -> Probes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_probes(layout: TrunkLayout, directions: Mapping[str, torch.Tensor] | dict[str, torch.Tensor],
                   n_random: int, seed: int, *, block_backbone: torch.Tensor | None = None, consume: bool = False,
                   budget: int | None = DEFAULT_MEMORY_BUDGET, spill_dir: str | None = None) -> Probes:
    """The probes of "backbone" and the other named ``directions`` (unit float64 ``[D]``: :func:`tensor_rows`)
    with ``n_random`` random directions seeded by ``seed``. ``block_backbone``: the blocks' own backbones for b_l
    (zero on a block without one: the trunk's v_b restricted to it). With ``consume`` each direction is popped
    from the caller's dict as it is copied, so every D-vector is held once."""
    rows = tensor_rows(layout, directions, block_backbone, consume=consume, budget=budget, spill_dir=spill_dir)
    return _with_random(rows, n_random, seed)


def _with_random(rows: DirectionRows, n_random: int, seed: int) -> Probes:
    """The probes of ``rows`` and K random directions; the rows are closed when those cannot be drawn."""
    try:
        return Probes(rows, RandomDirections(rows.row("backbone"), int(n_random), int(seed)))
    except BaseException:
        rows.close()
        raise


def _restore(model: torch.nn.Module, requires_grad: Mapping[str, bool], training: bool) -> None:
    """Give ``model`` back its parameters' requires_grad flags and its train/eval mode."""
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad[n])
    model.train(training)


def _gram_eigenpairs(store: GradientStore, ctx: Any, M: int, device: str, chunk_elems: int,
                     visit: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Gram ``[M, M]``, eigenvalues descending ``[M]``, eigenvectors ``[M, M]``) of the stored gradients, in one
    pass over their columns that ``visit`` also sees (this rank's rows).

    Several processes: rank 0 gathers the Gram and decomposes it once for all ranks, so the coefficients of u_1
    agree everywhere; the Gram goes with it (the bootstrap over batches needs it on every rank)."""
    if ctx is None:
        gram = store.gram(device, chunk_elems, visit=visit, align=RANDOM_BLOCK)
        s, a = _eig_desc(gram)
        return gram, s, a
    gram = store.gram_gathered(ctx, M, device, chunk_elems, visit=visit, align=RANDOM_BLOCK)
    eig = np.zeros(M + 2 * M * M, dtype=np.float64)
    if gram is not None:
        s0, a0 = _eig_desc(gram)
        eig = np.concatenate([s0, a0.reshape(-1), gram.reshape(-1)])
    eig = ctx.broadcast(eig)
    return eig[M + M * M :].reshape(M, M).copy(), eig[:M].copy(), eig[M : M + M * M].reshape(M, M).copy()


class _Projections:
    """The pass's products for this rank's ``count`` gradient rows, accumulated chunk by chunk on ``dev``:
    G N^T (the named rows), G Z^T (the random draws) and, per block l, <g_l, v_b^(l)>."""

    def __init__(self, probes: Probes, layout: TrunkLayout, count: int, dev: torch.device):
        self.probes, self.dev = probes, dev
        self.ranges = list(layout.block_ranges.values())
        self.n_rows = len(probes.rows.index)
        self.named = torch.zeros((count, self.n_rows), dtype=torch.float64, device=dev)
        self.gz = torch.zeros((count, probes.n_random), dtype=torch.float64, device=dev)
        self.blocks = torch.zeros((count, len(self.ranges)), dtype=torch.float64, device=dev)

    def __call__(self, lo: int, hi: int, c: torch.Tensor) -> None:
        arr = self.probes.rows.store.array
        named = arr[list(self.probes.rows.index), lo:hi].to(self.dev)
        self.named += c @ named.T
        if self.probes.n_random:
            self.gz += c @ torch.from_numpy(self.probes.random.draws(lo, hi)).to(self.dev).T
        vbb = self.probes.vb_blocks
        for j, (blo, bhi) in enumerate(self.ranges):
            a, b = max(lo, blo), min(hi, bhi)
            if a < b:
                self.blocks[:, j] += c[:, a - lo : b - lo] @ vbb[a:b].to(self.dev)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(G N^T, G W^T for the random directions, the block dots), on the host."""
        named = self.named.cpu().numpy()
        return named, self.probes.random.project(self.gz.cpu().numpy(), named[:, 0]), self.blocks.cpu().numpy()


def _top_eigenvector(store: GradientStore, ctx: Any, s: np.ndarray, a: np.ndarray, mine: range, M: int, device: str,
                     chunk_elems: int) -> np.ndarray | None:
    """u_1 = G^T a_1 / ||G^T a_1|| (float64 ``[D]``), None when the gradients are all zero. Several processes: the
    sum of each rank's G_r^T a_1 over its own batches."""
    if not s[0] > 0:
        return None
    if ctx is None:
        u = store.combine(a[:, 0], device, chunk_elems)
    else:
        u = store.combine(a[list(mine), 0], device, chunk_elems, rows=M, reduce=ctx.all_reduce_sum)
    return u / np.linalg.norm(u)


def fisher_at_model(
    model: torch.nn.Module,
    data: Any,
    layout: TrunkLayout,
    directions: Mapping[str, torch.Tensor] | None,
    settings: FisherSettings,
    step: int = 0,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    probes: Probes | None = None,
) -> FisherCheckpoint:
    """The Fisher quantities of ``model`` (parameters already loaded, on the analysis device).

    directions: name -> unit float64 ``[D]`` in ``layout`` order; must contain "backbone". probes:
    :func:`prepare_probes` of the same directions with ``settings.n_random`` random ones seeded by
    ``settings.seed`` (built here when None), to build them once for many checkpoints. Batch i is ``data.batch("train", i, batch_size,
    settings.seed)``. ``progress(1)`` after each gradient (of this rank, when several processes share the batches:
    see the module docstring; every rank must call this function, and every rank gets the same result).
    """
    if probes is None and (directions is None or "backbone" not in directions):
        raise UsageError("the fisher analysis needs a backbone direction")
    M, D = int(settings.batches), layout.dim
    if M < 1:
        raise UsageError(f"$batches={M}: need at least 1", param="batches")
    dev = next(model.parameters()).device
    with contextlib.ExitStack() as own:
        if probes is None:
            assert directions is not None
            probes = prepare_probes(layout, directions, settings.n_random, settings.seed,
                                    budget=settings.memory_budget, spill_dir=settings.spill_dir)
            own.callback(probes.close)
        return _fisher_at_model(model, data, layout, probes, settings, step, batch_size, progress, M, D, dev)


def _fisher_at_model(model: torch.nn.Module, data: Any, layout: TrunkLayout, probes: Probes, settings: FisherSettings,
                     step: int, batch_size: int, progress: Callable[[int], None] | None, M: int, D: int,
                     dev: torch.device) -> FisherCheckpoint:
    named, n_named, K = list(probes.names), len(probes.names), probes.n_random
    ranges = layout.block_ranges
    params = _params_of(model, layout)
    from ckptaudit.analyses import distributed

    ctx = distributed.active()
    mine = range(M) if ctx is None else range(ctx.rank, M, ctx.world_size)  # batch i on rank i % W
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    hv_dirs = None
    if settings.hessian:
        like = {n: p.detach() for n, p in params.items()}
        # Hessian-vector products need each direction whole, the random ones too: held for this option only.
        whole = [probes.rows.row(n).to(dev) for n in named] + list(probes.random.materialise().to(dev))
        hv_dirs = [layout.unflatten(w, like) for w in whole]
        del whole
    store: GradientStore | None = None
    # Zeros in the rows of other ranks' batches: the sum over ranks is then exact.
    proj = np.zeros((M, n_named + K), dtype=np.float64)
    norms = np.zeros(M, dtype=np.float64)
    block_cos = np.zeros((M, len(ranges)), dtype=np.float64)
    block_dot = np.zeros((M, len(ranges)), dtype=np.float64)
    block_norm = np.zeros((M, len(ranges)), dtype=np.float64)
    losses = np.zeros(M, dtype=np.float64)
    curv = np.zeros((M, n_named + K), dtype=np.float64) if settings.hessian else None
    # The fused attention kernels have no double backward; the math kernel does (same results to rounding).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stores: list[GradientStore] = []
    with contextlib.ExitStack() as stack:
        # Undone in reverse order: the attention kernel, the gradient store, then the model's flags and mode.
        stack.callback(_restore, model, saved_flags, was_training)
        stack.callback(lambda: [st.close() for st in stores])
        if settings.hessian:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        model.eval()
        # Only the analysed tensors need gradients: the rest of the backward pass is skipped.
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        if ctx is not None:  # a rank may get no batch (M < W) but joins the collectives with the gradient dtype
            store = GradientStore(len(mine), D, _gradient_dtype(params.values()), settings.memory_budget,
                                  settings.spill_dir, device=dev)
            stores.append(store)
        # Per-batch scalars stay on the device until the loop ends: no host synchronisation per gradient.
        packed_rows: list[torch.Tensor] = []
        curv_rows: list[torch.Tensor] = []
        for i in mine:
            batch = data.batch("train", i, batch_size, settings.seed)
            g, loss, grads = flat_gradient(model, data, batch, layout, create_graph=settings.hessian)
            if g.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; float32 holds fp16/bf16 exactly
                g = g.float()
            if store is None:
                dtype = np.dtype(str(g.dtype).replace("torch.", ""))
                store = GradientStore(M, D, dtype, settings.memory_budget, settings.spill_dir, device=dev)
                stores.append(store)
            squares = [torch.dot(seg, seg) for seg in (g[lo:hi].to(torch.float64) for lo, hi in ranges.values())]
            packed_rows.append(torch.cat([torch.stack(squares), loss.detach().to(torch.float64).reshape(1)]))
            store.append(g)
            if hv_dirs is not None:
                names = list(params)
                hvs = []
                for j, vd in enumerate(hv_dirs):
                    gv = sum((gr * vd[n]).sum() for n, gr in zip(names, grads, strict=True))
                    hv = torch.autograd.grad(gv, list(params.values()), retain_graph=j < len(hv_dirs) - 1)
                    hvs.append(sum((h.to(torch.float64) * vd[n].to(torch.float64)).sum()
                                   for n, h in zip(names, hv, strict=True)))
                curv_rows.append(torch.stack(hvs))
            del g, grads, loss
            if progress is not None:
                progress(1)
        idx = list(mine)
        if packed_rows:  # one device -> host transfer for all the scalars of this rank's batches
            packed = torch.stack(packed_rows).cpu().numpy()
            squares_np = packed[:, :-1]
            norms[idx] = np.sqrt(squares_np.sum(axis=1))  # the blocks partition the layout
            block_norm[idx] = np.sqrt(squares_np)
            losses[idx] = packed[:, -1]
            if curv is not None:
                curv[idx] = torch.stack(curv_rows).cpu().numpy()
        # One pass over the stored gradients: the Gram, and the projections on every direction.
        visit = _Projections(probes, layout, store.count, dev)
        gram, s, a = _gram_eigenpairs(store, ctx, M, str(dev), settings.chunk_elems, visit)
        proj[idx, :n_named], proj[idx, n_named:], block_dot[idx] = visit.result()
        with np.errstate(invalid="ignore", divide="ignore"):
            block_cos[idx] = block_dot[idx] / block_norm[idx]
        if ctx is not None:
            proj, norms, block_cos, block_dot, block_norm, losses, curv = _sum_over_ranks(
                ctx, proj, norms, block_cos, block_dot, block_norm, losses, curv)
        # |<u_1, v_b>| = |a_1 . G v_b| / ||G^T a_1||, and ||G^T a_1||^2 = s_1: no D-vector needed for it.
        overlap = abs(float(a[:, 0] @ proj[:, 0])) / float(np.sqrt(s[0])) if s[0] > 0 else float("nan")
        u1 = _top_eigenvector(store, ctx, s, a, mine, M, str(dev), settings.chunk_elems) if settings.keep_eigenvector else None
        where = store.where
    q_all = (proj**2).mean(axis=0)
    q = {n: float(q_all[j]) for j, n in enumerate(named)}
    q_rand = q_all[n_named:]
    q["random_mean"] = float(q_rand.mean()) if K else float("nan")
    cos = np.abs(proj[:, 0]) / norms
    ssum = float(s.sum())
    hessian = hess_rand = None
    if curv is not None:
        c_all = curv.mean(axis=0)
        hessian = {n: float(c_all[j]) for j, n in enumerate(named)}
        hess_rand = c_all[n_named:]
        hessian["random_mean"] = float(hess_rand.mean()) if K else float("nan")
    boot = batch_bootstrap(proj, n_named, named, norms, gram, block_cos, block_dot, list(ranges), D,
                           n_boot=settings.bootstrap, seed=settings.seed)
    return FisherCheckpoint(
        step=int(step), dim=D, q=q, q_random=q_rand,
        anisotropy=q["backbone"] / q["random_mean"] if K and q["random_mean"] > 0 else float("nan"),
        eigenvalues=s / M, top=int(settings.top), top_overlap_backbone=overlap,
        effective_rank=ssum**2 / float((s**2).sum()) if ssum > 0 else float("nan"),
        grad_backbone_cos_mean=float(np.mean(cos)), grad_backbone_cos_std=float(np.std(cos)),
        block_signed_projection={b: float(np.mean(block_cos[:, j])) for j, b in enumerate(ranges)},
        projections=proj, direction_names=(*named, *[f"random_{k}" for k in range(K)]), grad_norms=norms,
        losses=losses, gradient_storage=where, hessian=hessian, hessian_random=hess_rand,
        u1=u1, block_projections=block_dot, block_grad_norms=block_norm,
        gram=gram, bootstrap=boot,
    )


# ------------------------------------------------------------------------------------------- over a run


def _default_batch_size(ckpt: StoredCheckpoint) -> int:
    """The training batch size recorded in the checkpoint's ckptaudit_task.json, else 32."""
    from ckptaudit.errors import DataError
    from ckptaudit.tasks import TASK_FILE, load_task_spec

    if not (ckpt.directory / TASK_FILE).is_file():
        return 32
    try:
        return int(load_task_spec(ckpt.directory).get("batch_size") or 32)
    except (DataError, TypeError, ValueError):
        return 32


def run_fisher(
    checkpoints: Sequence[StoredCheckpoint],
    settings: FisherSettings,
    vectors: str | Path | MemoryVectorSink,
    task: str | None = None,
    data: str | Path | None = None,
    seq_len: int | None = None,
    switch: tuple[int, int] | None = None,
    switch_run: RunLike | None = None,
    progress: Callable[[int], None] | None = None,
    windows: Any = None,
    dtype: str | None = None,
) -> FisherReport:
    """Fisher analysis at each of ``checkpoints`` (Checkpoint objects, any order; reported by ascending step).

    vectors: a ``backbone --save-vectors`` file (v_b, PC2..PC6, optional switch), or a completed MemoryVectorSink
    of ``run_backbone`` (the same entries, kept in memory). switch: (peak, trough) steps of
    ``switch_run`` for the switching direction (overrides one stored in the file). task / data / seq_len: as
    :func:`ckptaudit.tasks.data.load_data` (``windows``: its WindowSpec). ``dtype``: the model's precision
    (io.precision: "auto" = the checkpoint's dtype on a GPU, float32 on the CPU). The layout, directions and random
    directions are fixed by the first checkpoint and reused, so q(t) is measured along the same vectors at every step.
    """
    import time

    from ckptaudit.io.models import load_model
    from ckptaudit.io.precision import resolve_dtype
    from ckptaudit.io.roles import resolve_architecture
    from ckptaudit.tasks.data import check_enough, load_data

    ckpts = sorted(checkpoints, key=lambda c: int(c.step))
    if not ckpts:
        raise UsageError("no checkpoints to analyse")
    first = ckpts[0]
    with first.tensors() as src:
        shapes = {n: tuple(src.shape(n)) for n in src.keys()}
    arch = resolve_architecture(shapes, first.config())
    layout = trunk_layout(arch, settings.block, settings.include_bias)
    sw = None
    if switch is not None:
        if switch_run is None:
            raise UsageError("$switch needs the run", "give $backbone_run=RUN or a run directory", param="switch")
        sw = switch_direction(switch_run, int(switch[0]), int(switch[1]), layout)
    # Each D-vector held once, read straight into the rows of the probes (in RAM within the memory budget, else a
    # memmap); the random directions are never held.
    rows = direction_rows(vectors, layout, switch=sw, budget=settings.memory_budget, spill_dir=settings.spill_dir)
    del sw
    # Closed on the way out, whatever happens: a memmap of the rows is removed.
    with _with_random(rows, settings.n_random, settings.seed) as probes:
        dataset = load_data(first, task=task, data=data, seq_len=seq_len, windows=windows)
        batch_size = int(settings.batch_size or _default_batch_size(first))
        check_enough(dataset, settings.batches, batch_size)
        torch_dtype, precision = resolve_dtype(dtype, first, settings.device)
        results = []
        for c in ckpts:
            stage = getattr(progress, "stage", None)
            if stage is not None:
                from ckptaudit.analyses import distributed

                ctx = distributed.active()
                share = settings.batches if ctx is None else len(range(ctx.rank, settings.batches, ctx.world_size))
                stage(f"fisher step {c.step}", share)
            t0 = time.perf_counter()
            model = load_model(c, device=settings.device, dtype=torch_dtype)
            r = fisher_at_model(model, dataset, layout, None, settings, step=int(c.step),
                                batch_size=batch_size, progress=progress, probes=probes)
            results.append(dataclasses.replace(r, seconds=time.perf_counter() - t0))
            del model
        blocks = sorted(layout.block_ranges)
        running = {b: np.cumsum([r.block_signed_projection[b] for r in results]) for b in blocks}
        spec = dataset.task_spec() if hasattr(dataset, "task_spec") else {}
        record = {
            "batches": settings.batches, "batch_size": batch_size, "n_random": settings.n_random,
            "block": settings.block, "include_bias": settings.include_bias, "hessian": settings.hessian, "memory_budget": int(settings.memory_budget),
            "seed": settings.seed, "device": str(settings.device), "top": settings.top, "vectors": str(vectors),
            "bootstrap": settings.bootstrap,
            "switch": list(switch) if switch else None, "directions": list(probes.names),
            "architecture": arch.name, "data": spec,
            "block_directions": "own block backbones" if probes.rows.own_blocks else "trunk v_b restricted to each block",
            "direction_storage": probes.rows.store.where.split(":", 1)[0],
            "gradient_storage": sorted({r.gradient_storage.split(":", 1)[0] for r in results}),
            "precision": precision.to_json(),
        }
        return FisherReport(checkpoints=tuple(results), dim=layout.dim, settings=record, block_running_sum=running,
                            direction_cosines=probes.rows.cosines())


def fisher_anisotropy(run: RunLike[StoredCheckpoint], vectors: str | Path | MemoryVectorSink, device: str = "cpu", seed: int = 0, batches: int = 16) -> float:
    """Anisotropy alpha = q(v_b) / mean q(random) at the last checkpoint of ``run``: what ``ckptaudit gate`` checks.

    ``vectors``: the run's own backbone vectors (``run_backbone(run, save_vectors=...)``, a file or a
    MemoryVectorSink; the gate computes them once, in memory, and shares them between its checks). The quotients are measured on the data recorded in the checkpoint.
    """
    settings = FisherSettings(batches=batches, seed=seed, device=device)
    return float(run_fisher([run.checkpoints[-1]], settings, vectors).checkpoints[-1].anisotropy)
