"""Sampling uncertainty of the fisher quantities (SPEC §2; formulas in docs/uncertainty.md).

Two random draws enter every fisher number: the K random unit directions w_k (seeded Gaussians, Gram-Schmidt
against v_b and each other) and the M mini-batches (seeded draws from the training split). Everything here is a
function of per-batch scalars the analysis already has: the projections p_ij = <g_i, v_j> (``[M, J]``, column 0 =
v_b, then the named directions, then the K random ones), the gradient norms ||g_i||, the block dot products
<g_{i,l}, v_b^(l)> and block norms ||g_{i,l}||, and the M x M Gram K = G G^T (float64).

Random directions, given the batches (F = (1/M) G^T G, P = I - v_b v_b^T, n = D - 1):

- ``q_random_std``: population std of the K sampled q(w_k) (numpy's ``std``, as the paper's code reports it);
  ``q_random_se`` = std(ddof 1) / sqrt(K), the standard error of their mean (``anisotropy_se`` is alpha times
  ``q_random_se`` / mean).
- exact, for w uniform on the unit sphere orthogonal to v_b: E q(w) = a1 / n and
  Var q(w) = 2 (n a2 - a1^2) / (n^2 (n + 2)), with a1 = tr(P F P) = tr F - q(v_b) and
  a2 = tr((P F P)^2) = tr F^2 - 2 v_b^T F^2 v_b + q(v_b)^2, where tr F^2 = ||K||_F^2 / M^2 and
  v_b^T F^2 v_b = p^T K p / M^2 (p = G v_b). ``q_random_std_exact`` = sqrt(Var q(w)). The K directions are a
  uniformly random orthonormal K-frame of that (D-1)-dimensional space; over a whole basis the quotients sum to the
  constant a1, so two of them have covariance -Var / (n - 1) and the mean of K has variance
  Var / K * (n - K) / (n - 1): ``q_random_se_exact``, the exact standard error of ``random_mean``.

Batches: a seeded bootstrap (numpy ``default_rng(seed)``; replicate b draws multinomial counts c_b over the M
batches, the same counts for every quantity), with the random directions held fixed. Replicate b is the analysis
on the resampled gradient matrix (rows repeated c_bi times): its Fisher F_b = (1/M) G^T C_b G, C_b = diag(c_b), so

- q_b(v_j) = (1/M) sum_i c_bi p_ij^2, tr F_b = (1/M) sum_i c_bi ||g_i||^2, and alpha, alpha_exact from those;
- its eigenvalues are those of C_b^(1/2) K C_b^(1/2) / M; with (s, a) its top eigenpair, u_1 = G^T C_b^(1/2) a /
  sqrt(s), so |<u_1, v_b>| = |(C_b^(1/2) a) . p| / sqrt(s); the effective rank (sum s)^2 / sum s^2;
- the batch means (|cos(g_i, v_b)|, <g_i, v_b>, b_l, the raw block projections) are (1/M) sum_i c_bi x_i.

Reported per quantity: the bootstrap standard error (std of the replicates, ddof 1) and the percentile interval at
``level`` (default 95%). The plain means over batches also get the closed-form standard error std(ddof 1) / sqrt(M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_BOOTSTRAP = 200
DEFAULT_LEVEL = 0.95


def mean_se(x: np.ndarray) -> float:
    """std(x, ddof 1) / sqrt(n) over the finite entries (NaN with fewer than 2)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else math.nan


def random_direction_stats(q_random: np.ndarray, trace: float, q_backbone: float, gram: np.ndarray | None,
                           p_backbone: np.ndarray, dim: int) -> dict[str, float]:
    """``q_random_std``, ``q_random_se``, ``q_random_std_exact``, ``q_random_se_exact`` (module docstring)."""
    qr = np.asarray(q_random, dtype=np.float64)
    K = int(qr.size)
    out = {"q_random_std": float(qr.std()) if K else math.nan, "q_random_se": mean_se(qr),
           "q_random_std_exact": math.nan, "q_random_se_exact": math.nan}
    n = dim - 1
    if gram is None or n < 1:
        return out
    M = gram.shape[0]
    p = np.asarray(p_backbone, dtype=np.float64)
    a1 = trace - q_backbone
    a2 = float(np.sum(gram * gram)) / M**2 - 2.0 * float(p @ gram @ p) / M**2 + q_backbone**2
    var = max(0.0, 2.0 * (n * a2 - a1 * a1) / (n * n * (n + 2.0)))
    out["q_random_std_exact"] = math.sqrt(var)
    if K >= 1 and n >= 2:
        out["q_random_se_exact"] = math.sqrt(var / K * max(0.0, (n - K) / (n - 1.0)))
    return out


def _desc_eig(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, a = np.linalg.eigh(S)
    order = np.argsort(s)[::-1]
    return np.clip(s[order], 0.0, None), a[:, order]


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else math.nan


def _se(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if x.size >= 2 else math.nan


def batch_replicates(proj: np.ndarray, n_named: int, names: Sequence[str], norms: np.ndarray, gram: np.ndarray,
                     block_cos: np.ndarray, block_proj: np.ndarray, blocks: Sequence[int], dim: int,
                     counts: np.ndarray) -> dict[str, np.ndarray]:
    """The bootstrap replicates ``[B]`` of every quantity for resampling counts ``counts`` ``[B, M]``.

    proj ``[M, J]`` (J = n_named + K, column 0 = v_b), names: the ``n_named`` named directions; block_cos /
    block_proj ``[M, n_blocks]`` (b_l terms and raw <g_{i,l}, v_b^(l)>), blocks their block numbers.
    """
    W = np.asarray(counts, dtype=np.float64)
    B, M = W.shape
    sq = proj**2
    q = W @ sq / M  # [B, J]
    K = proj.shape[1] - n_named
    out: dict[str, np.ndarray] = {f"q_{n}": q[:, j] for j, n in enumerate(names)}
    with np.errstate(invalid="ignore", divide="ignore"):
        rmean = q[:, n_named:].mean(axis=1) if K else np.full(B, math.nan)
        out["q_random_mean"] = rmean
        out["anisotropy"] = np.where(rmean > 0, q[:, 0] / np.where(rmean > 0, rmean, 1.0), math.nan)
        trace = W @ (norms**2) / M
        out["trace"] = trace
        expected = (trace - q[:, 0]) / (dim - 1) if dim > 1 else np.full(B, math.nan)
        out["anisotropy_exact"] = np.where(expected > 0, q[:, 0] / np.where(expected > 0, expected, 1.0), math.nan)
        cos = np.abs(proj[:, 0]) / norms
        out["grad_backbone_cos_mean"] = W @ np.nan_to_num(cos) / M
        out["grad_backbone_projection_mean"] = W @ proj[:, 0] / M
    lam1, erank, overlap = np.full(B, math.nan), np.full(B, math.nan), np.full(B, math.nan)
    p = proj[:, 0]
    for b in range(B):
        sw = np.sqrt(W[b])
        s, a = _desc_eig(sw[:, None] * gram * sw[None, :])
        lam1[b] = s[0] / M
        total = float(s.sum())
        if total > 0:
            erank[b] = total**2 / float((s**2).sum())
        if s[0] > 0:
            overlap[b] = abs(float((sw * a[:, 0]) @ p)) / math.sqrt(float(s[0]))
    out["lambda_1"], out["effective_rank"], out["top_overlap_backbone"] = lam1, erank, overlap
    for j, blk in enumerate(blocks):
        out[f"block_signed_projection_{blk}"] = W @ np.nan_to_num(block_cos[:, j]) / M
        out[f"block_projection_mean_{blk}"] = W @ np.nan_to_num(block_proj[:, j]) / M
    return out


def batch_bootstrap(proj: np.ndarray, n_named: int, names: Sequence[str], norms: np.ndarray, gram: np.ndarray,
                    block_cos: np.ndarray, block_proj: np.ndarray, blocks: Sequence[int], dim: int,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, Any] | None:
    """Seeded bootstrap over the M batches (module docstring): {n_boot, seed, level, resampled, se {name},
    ci_low {name}, ci_high {name}, replicates {name: [B]}}; None when n_boot < 2 or M < 2."""
    M = int(proj.shape[0])
    if n_boot < 2 or M < 2:
        return None
    rng = np.random.default_rng(int(seed))
    counts = rng.multinomial(M, np.full(M, 1.0 / M), size=int(n_boot))
    reps = batch_replicates(proj, n_named, names, norms, gram, block_cos, block_proj, blocks, dim, counts)
    tail = (1.0 - level) / 2 * 100
    return {
        "n_boot": int(n_boot), "seed": int(seed), "level": float(level),
        "resampled": f"{M} mini-batches with replacement (random directions fixed)",
        "se": {k: _se(v) for k, v in reps.items()},
        "ci_low": {k: _pct(v, tail) for k, v in reps.items()},
        "ci_high": {k: _pct(v, 100 - tail) for k, v in reps.items()},
        "replicates": reps,
    }


def bootstrap_json(boot: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bootstrap without its replicates, NaN as None (for the JSON document)."""
    if boot is None:
        return None

    def clean(d: dict) -> dict:
        return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in d.items()}

    return {k: (clean(v) if k in ("se", "ci_low", "ci_high") else v) for k, v in boot.items() if k != "replicates"}


def bootstrap_hdf5(boot: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bootstrap for HDF5: se/, ci_low/, ci_high/ as attributes, replicates/ as float64 datasets."""
    if boot is None:
        return None
    tree = dict(boot)
    tree["replicates"] = {k: np.asarray(v, dtype=np.float64) for k, v in boot["replicates"].items()}
    return tree
