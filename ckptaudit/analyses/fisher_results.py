"""Results of the fisher analysis (SPEC §2): one checkpoint (:class:`FisherCheckpoint`) and a run
(:class:`FisherReport`), with their JSON and HDF5 forms. The computation is in :mod:`ckptaudit.analyses.fisher`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def noise_floor(dim: int) -> float:
    """sqrt(2 / (pi D)): E|<x, v>| for x uniform on the unit sphere in dimension D and a fixed unit v (large D)."""
    return math.sqrt(2.0 / (math.pi * dim))


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FisherCheckpoint:
    """Fisher analysis at one checkpoint.

    q: direction name -> q(v) (gradient units squared), plus "random_mean". q_random: q(w_k), ``[K]``.
    eigenvalues: all M Gram eigenvalues s_j / M, descending (the Fisher's nonzero spectrum). projections:
    ``[M, n_dir]`` <g_i, v> per batch and direction (``direction_names`` order). block_signed_projection: block ->
    b_l. hessian: direction name -> (1/M) sum_i v^T H_i v plus "random_mean" (None without --hessian).
    """

    step: int
    dim: int
    q: dict[str, float]
    q_random: np.ndarray
    anisotropy: float
    eigenvalues: np.ndarray
    top: int
    top_overlap_backbone: float
    effective_rank: float
    grad_backbone_cos_mean: float
    grad_backbone_cos_std: float
    block_signed_projection: dict[int, float]
    projections: np.ndarray
    direction_names: tuple[str, ...]
    grad_norms: np.ndarray
    losses: np.ndarray
    gradient_storage: str
    hessian: dict[str, float] | None = None
    hessian_random: np.ndarray | None = None
    u1: np.ndarray | None = field(default=None, repr=False)
    seconds: float | None = None

    @property
    def trace(self) -> float:
        """tr F = (1/M) sum_i ||g_i||^2 (gradient units squared)."""
        return float(np.mean(np.asarray(self.grad_norms, dtype=np.float64) ** 2))

    @property
    def random_expected(self) -> float:
        """E q(w) over unit w uniform on the sphere orthogonal to v_b: (tr F - q(v_b)) / (D - 1), exact."""
        return (self.trace - self.q["backbone"]) / (self.dim - 1) if self.dim > 1 else float("nan")

    @property
    def anisotropy_exact(self) -> float:
        """q(v_b) / E q(w): the anisotropy without the sampling noise of the K random directions."""
        e = self.random_expected
        return self.q["backbone"] / e if e > 0 else float("nan")

    @property
    def anisotropy_se(self) -> float:
        """Standard error of ``anisotropy`` from the K random quotients (delta method: alpha * se(mean) / mean,
        se(mean) = sample std / sqrt(K)); NaN for K < 2."""
        qr = np.asarray(self.q_random, dtype=np.float64)
        if qr.size < 2 or not qr.mean() > 0:
            return float("nan")
        return float(self.anisotropy) * float(qr.std(ddof=1) / math.sqrt(qr.size)) / float(qr.mean())

    @property
    def noise_floor(self) -> float:
        """sqrt(2 / (pi D))."""
        return noise_floor(self.dim)

    @property
    def top_eigenvalues(self) -> np.ndarray:
        """The ``top`` largest Fisher eigenvalues s_j / M."""
        return self.eigenvalues[: self.top]

    def to_json(self) -> dict[str, Any]:
        """{step, q, anisotropy, top_eigenvalues, top_overlap_backbone, effective_rank, grad_backbone_cos_mean,
        grad_backbone_cos_std, noise_floor, block_signed_projection {"<l>": b_l}}."""
        return {
            "step": int(self.step),
            "q": {k: float(v) for k, v in self.q.items()},
            "anisotropy": float(self.anisotropy),
            "anisotropy_se": self.anisotropy_se,
            "anisotropy_exact": self.anisotropy_exact,
            "random_expected": self.random_expected,
            "trace": self.trace,
            "top_eigenvalues": [float(x) for x in self.top_eigenvalues],
            "top_overlap_backbone": float(self.top_overlap_backbone),
            "effective_rank": float(self.effective_rank),
            "grad_backbone_cos_mean": float(self.grad_backbone_cos_mean),
            "grad_backbone_cos_std": float(self.grad_backbone_cos_std),
            "noise_floor": float(self.noise_floor),
            "block_signed_projection": {str(b): float(v) for b, v in self.block_signed_projection.items()},
        }

    def to_hdf5_tree(self) -> dict[str, Any]:
        """/fisher/step_<t>/: q/ (attrs per direction), datasets q_random, eigenvalues, projections, grad_norms,
        losses, blocks, block_signed_projection; attrs anisotropy, effective_rank, ...; hessian/ when computed."""
        blocks = sorted(self.block_signed_projection)
        tree: dict[str, Any] = {
            "step": int(self.step), "dim": int(self.dim),
            "q": {k: float(v) for k, v in self.q.items()},
            "q_random": np.asarray(self.q_random, dtype=np.float64),
            "anisotropy": float(self.anisotropy),
            "anisotropy_se": self.anisotropy_se,
            "anisotropy_exact": self.anisotropy_exact,
            "random_expected": self.random_expected,
            "trace": self.trace,
            "seconds": self.seconds,
            "eigenvalues": np.asarray(self.eigenvalues, dtype=np.float64),
            "top_eigenvalues": np.asarray(self.top_eigenvalues, dtype=np.float64),
            "top_overlap_backbone": float(self.top_overlap_backbone),
            "effective_rank": float(self.effective_rank),
            "grad_backbone_cos_mean": float(self.grad_backbone_cos_mean),
            "grad_backbone_cos_std": float(self.grad_backbone_cos_std),
            "noise_floor": float(self.noise_floor),
            "blocks": np.asarray(blocks, dtype=np.int64),
            "block_signed_projection": np.asarray([self.block_signed_projection[b] for b in blocks], dtype=np.float64),
            "projections": np.asarray(self.projections, dtype=np.float64),
            "direction_names": list(self.direction_names),
            "grad_norms": np.asarray(self.grad_norms, dtype=np.float64),
            "losses": np.asarray(self.losses, dtype=np.float64),
            "gradient_storage": self.gradient_storage.split(":", 1)[0],
        }
        if self.hessian is not None:
            tree["hessian"] = {k: float(v) for k, v in self.hessian.items()}
            tree["hessian_random"] = np.asarray(self.hessian_random, dtype=np.float64)
        return tree


@dataclass(frozen=True, eq=False)
class FisherReport:
    """Fisher analysis over checkpoints (ascending step) with the backbone stiffening curve and running sums.

    block_running_sum: block -> B_l(t) = sum of b_l over the checkpoints up to t (one value per checkpoint).
    """

    checkpoints: tuple[FisherCheckpoint, ...]
    dim: int
    settings: dict[str, Any]
    block_running_sum: dict[int, np.ndarray]

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def stiffening(self) -> dict[str, list]:
        """{"steps", "q_backbone", "anisotropy"} over the checkpoints."""
        return {"steps": self.steps, "q_backbone": [c.q["backbone"] for c in self.checkpoints],
                "anisotropy": [c.anisotropy for c in self.checkpoints]}

    def to_json(self) -> dict[str, Any]:
        """{checkpoints: [FisherCheckpoint.to_json()], stiffening, block_running_sum {"<l>": [B_l(t)]}, hessian
        (list of {step, <direction>: v^T H v, random_mean} or None), dim, settings}."""
        hess = None
        if any(c.hessian is not None for c in self.checkpoints):
            hess = [{"step": c.step, **(c.hessian or {})} for c in self.checkpoints]
        return {
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "stiffening": self.stiffening(),
            "block_running_sum": {str(b): [float(x) for x in v] for b, v in self.block_running_sum.items()},
            "hessian": hess,
            "dim": int(self.dim),
            "settings": dict(self.settings),
        }

    def to_hdf5_tree(self) -> dict[str, Any]:
        """Tree for /fisher: step_<t>/ per checkpoint, stiffening/ (steps, q_backbone, anisotropy),
        block_running_sum/ (datasets "<l>"), attrs dim and settings_json."""
        tree: dict[str, Any] = {f"step_{c.step}": c.to_hdf5_tree() for c in self.checkpoints}
        s = self.stiffening()
        tree["stiffening"] = {k: np.asarray(v, dtype=np.float64 if k != "steps" else np.int64) for k, v in s.items()}
        tree["block_running_sum"] = {str(b): np.asarray(v, dtype=np.float64) for b, v in self.block_running_sum.items()}
        tree["dim"] = int(self.dim)
        tree["settings_json"] = json.dumps(self.settings, sort_keys=True, default=str)
        return tree
