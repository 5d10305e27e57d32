"""Several processes (and machines) for one analysis, through torch.distributed.

Launched with ``torchrun`` (``python -m torch.distributed.run``), every process sees RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment. :func:`init_from_env` starts the process group when
WORLD_SIZE > 1 ("gloo" on the CPU, "nccl" when the device is CUDA, with one GPU per local rank) and returns a
:class:`DistContext`; a plain single-process run gets None and needs no process group. Analyses ask
:func:`active` for the context, so library callers who start their own process group get the same behaviour.

How the backbone work splits: each rank streams a size-balanced share of the stored tensors
(:func:`ckptaudit.analyses.backbone.gram.balanced_shards`) and computes their per-piece Grams; :func:`allreduce_gramset`
sums the per-piece Grams over ranks (every piece is computed on exactly one rank, so the sum only adds zeros
and is exact) and every rank then adds the pieces into the group Grams in one fixed order. The group Grams are
therefore identical, bit for bit, to a single-process run with the same chunking.

How the fisher work splits: rank r takes mini-batches r, r + W, ...; see :mod:`ckptaudit.analyses.fisher.run`
(:meth:`DistContext.gather` brings the gradient chunks to rank 0 for the Gram, :meth:`DistContext.broadcast` its
eigenpairs back).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DistContext", "active", "allreduce_gramset", "init_from_env", "world_size_from_env"]


def world_size_from_env() -> int:
    """WORLD_SIZE from the environment (1 when unset or not a number)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class DistContext:
    """The process group this process belongs to: ``rank`` of ``world_size``; ``device`` is where its tensors
    go (``cuda:<local_rank>`` with nccl, ``cpu`` with gloo); ``owned`` when :func:`init_from_env` started the
    group (then :meth:`close` destroys it)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str
    owned: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes reports and prints."""
        return self.rank == 0

    def all_reduce_sum(self, arr: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``arr`` over all ranks (float64 kept; returns a new numpy array on every rank)."""
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).clone()
        if self.device != "cpu":
            t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def gather(self, arr: np.ndarray) -> list[np.ndarray] | None:
        """``arr`` of every rank (the same shape and dtype on all) on rank 0, in rank order; None on the others."""
        import torch.distributed as dist

        t = torch.from_numpy(np.array(arr, order="C"))  # a writable copy
        if self.device != "cpu":
            t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(t, gather_list=out, dst=0)
        return None if out is None else [x.cpu().numpy() for x in out]

    def broadcast(self, arr: np.ndarray, src: int = 0) -> np.ndarray:
        """Rank ``src``'s ``arr`` on every rank (the others pass an array of the same shape and dtype)."""
        import torch.distributed as dist

        t = torch.from_numpy(np.array(arr, order="C"))  # a writable copy
        if self.device != "cpu":
            t = t.to(self.device)
        dist.broadcast(t, src=src)
        return t.cpu().numpy()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.device.startswith("cuda"):
            dist.barrier(device_ids=[torch.device(self.device).index or 0])
        else:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context started it."""
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str = "cpu") -> DistContext | None:
    """Start the process group described by the torchrun environment, or None for a single process.

    device: the device the analysis asked for; "cuda..." selects nccl and the GPU ``cuda:<LOCAL_RANK>``, anything
    else gloo on the CPU. The rendezvous is ``env://`` (MASTER_ADDR / MASTER_PORT, set by torchrun).
    """
    if world_size_from_env() <= 1:
        return None
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            from ckptaudit.errors import UsageError

            n = torch.cuda.device_count()
            raise UsageError(f"local rank {local_rank} needs cuda:{local_rank}, but this machine has {n} CUDA "
                             f"device(s) (nccl takes one GPU per process)",
                             f"launch at most {n} process(es) per machine (torchrun --nproc-per-node {n}) "
                             "or use $device=cpu (gloo)", param="device")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
        owned = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       backend=dist.get_backend(), device=f"cuda:{local_rank}" if cuda else "cpu", owned=owned)


def active() -> DistContext | None:
    """The context of an initialised process group with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       backend=backend, device=device)


def allreduce_gramset(gs: Any, ctx: DistContext, tensor_names: tuple[str, ...] = ()) -> Any:
    """Combine the partial GramSets of all ranks (each over its own tensors) into the full GramSet.

    Sums the per-piece Grams and the processed flags over ranks, then adds pieces into groups in the canonical
    order (:meth:`PieceGrams.combine`). ``tensor_names``: every tensor processed by any rank (for the result).
    """
    from ckptaudit.analyses.backbone.gram import PieceGrams

    pg = gs.pieces
    if pg is None:
        raise ValueError("allreduce_gramset needs a GramSet from drift_grams (with per-piece Grams)")
    flat = np.concatenate([pg.grams.reshape(-1), pg.done.astype(np.float64)])
    total = ctx.all_reduce_sum(flat)
    n = pg.grams.size
    grams = total[:n].reshape(pg.grams.shape)
    done = total[n:] > 0.5
    full = PieceGrams(grams, done, pg.members, pg.numel, pg.group_names)
    return full.combine(tensor_names or gs.tensor_names)
