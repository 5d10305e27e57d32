"""Bulk geometry of a token-embedding matrix (SPEC §5; paper 002 section 6).

The rows of an embedding matrix ``E`` [V, d] are normalised to unit length and the distribution of the pairwise
cosine overlaps ``c_ij = <e_i, e_j>`` (dimensionless, in [-1, 1]) and of their squares ``s_ij = c_ij^2`` (in
[0, 1]) over pairs ``i != j`` is summarised. Two Kolmogorov–Smirnov distances classify the bulk of ``s``:

* ``ks_gauss``: sup-distance between the CDF of ``s`` and a Gaussian with the mean and std of ``s``;
* ``ks_exp``:   sup-distance between the CDF of ``s`` and an exponential with loc 0 and scale = mean of ``s``.

Class "A" (dense Gaussian bulk) when ``ks_gauss < ks_exp``, else class "B" (sparse exponential bulk).
``bulk_index = ks_exp - ks_gauss``: positive means class A, negative class B; its magnitude says how clear-cut.

Two modes:

* sampled (default): ``pairs`` ordered pairs ``(i, j)``, ``i != j``, drawn uniformly with replacement from a
  seeded ``torch.Generator``; KS by ``scipy.stats.kstest`` on the sample.
* exact: all ``V(V-1)/2`` unordered pairs, computed tile by tile as ``E_I @ E_J^T`` for ``J >= I`` (strict upper
  triangle on the diagonal tiles), streamed into an integer histogram of ``c`` with ``bins`` uniform bins on
  [-1, 1] plus float64 running sums (mean/std of ``c`` and ``s``) and exact threshold counts. No V x V matrix is
  ever held: peak memory is a few ``tile x tile`` float32 buffers.

  The histogram of ``s`` is the histogram of ``|c|`` folded from the symmetric ``c`` bins: its edges are
  ``(k * 2/bins)^2``, k = 0..bins/2. Because ``s`` is a monotone function of ``|c|`` the empirical CDF of ``s`` is
  exact at those edges; uniform bins of ``s`` on [0, 1] would put the whole bulk (``s ~ 1/d``) into a handful of
  bins. Quantiles are read from the histogram CDF (linear inside a bin: exact to within one bin width); the KS
  statistics compare the empirical CDF with the fitted continuous CDFs at every bin edge, which is the true sup to
  within the largest bin increment — ``ks_resolution`` bounds the gap.

The LoRA consequences use the paper's empirical class means of the reduced field, ``h_A = 1.69`` and
``h_B = 10.0`` (paper 002, Table 6): the predicted critical LoRA learning rate is ``lora_lr / h_class``. These
are constants fitted on six architectures, not derived quantities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptaudit.errors import DataError, UnknownArchitectureError
from ckptaudit.report.tree import TreeResult

#: Empirical class means of the reduced field h = eta_lora / eta_c from paper 002 (Table 6). Not derived.
H_CLASS: dict[str, float] = {"A": 1.69, "B": 10.0}
QUANTILE_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_BINS = 1 << 16
DEFAULT_LORA_LR = 2e-4
_THRESHOLDS = (0.3, 0.5)
#: Bins of the histogram of s in the JSON (the figure of ``--plot``) and the quantile of s its range ends at.
DISPLAY_BINS = 100
DISPLAY_QUANTILE = 0.995
MAX_PAIRS = 100_000_000  # sampled overlaps take ~24 bytes a pair: far beyond this no machine holds them


@dataclass(frozen=True)
class EmbeddingClassResult(TreeResult):
    """Bulk overlap statistics of one normalised embedding matrix and its class (SPEC §5).

    Overlaps ``c`` and squared overlaps ``s = c^2`` are dimensionless. ``pairs`` is the number of pairs the
    statistics are over (sampled ordered pairs, or all V(V-1)/2 unordered pairs in exact mode). ``std_*`` are
    population standard deviations (ddof = 0). ``quantiles_*`` follow ``quantile_levels``.
    """

    vocab_size: int
    dim: int
    n_used: int
    n_zero_rows: int
    n_excluded: int
    pairs: int
    exact: bool
    seed: int
    mean_c: float
    std_c: float
    quantiles_c: tuple[float, ...]
    mean_c2: float
    std_c2: float
    quantiles_c2: tuple[float, ...]
    frac_abs_c_gt_0_3: float
    frac_abs_c_gt_0_5: float
    ks_gauss: float
    ks_exp: float
    bulk_index: float
    bulk_class: str
    lora_sufficient: bool
    lora_lr: float
    h_class: float
    predicted_critical_lora_lr: float
    tied_head: bool | None = None
    quantile_levels: tuple[float, ...] = QUANTILE_LEVELS
    #: exact mode only: number of uniform c-bins on [-1, 1] and the bound on |KS_edges - KS_true|.
    bins: int | None = None
    ks_resolution: float | None = None
    #: exact mode only: counts per c-bin (int64, length ``bins``).
    hist_c: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: standard errors and bootstrap intervals of the sampled statistics (:mod:`.embeddings_uncertainty`)
    uncertainty: dict | None = field(default=None, compare=False, repr=False)
    #: coarse histogram of s (:func:`display_histogram`): edges, counts, above, range_quantile
    histogram_c2: dict | None = field(default=None, compare=False, repr=False)

    JSON_ONLY = frozenset({"mean_c2", "std_c2", "quantiles_c2", "histogram_c2"})  # the report's c2/ and histogram/
    HDF5_ONLY = frozenset({"n_used", "n_zero_rows", "n_excluded", "seed", "bulk_index_sign", "ks_resolution", "lora_lr",
                           "h_class", "h_class_source", "quantile_levels", "c", "c2", "histogram"})
    HDF5_SKIP_NONE = frozenset({"histogram"})  # exact mode only
    HDF5_LAYOUT = {"uncertainty": "_uncertainty_tree"}  # the report's intervals as datasets, absent without them

    def to_tree(self) -> dict:
        """Keys of the ``--json`` payload (fixed by issue 7): vocab_size, dim, pairs, exact, mean_c2, std_c2,
        quantiles_c2 (level -> value), frac_abs_c_gt_0_3, frac_abs_c_gt_0_5, ks_gauss, ks_exp, bulk_index, class,
        lora_sufficient, predicted_critical_lora_lr, tied_head, uncertainty, histogram_c2. The report (scalars as
        attributes, arrays as datasets) adds n_used, n_zero_rows, n_excluded, seed, bulk_index_sign, ks_resolution,
        lora_lr, h_class, h_class_source, quantile_levels, c and c2 (mean, std, quantiles) and, in exact mode,
        histogram (bins, c_edges, c_counts, c2_edges, c2_counts)."""
        histogram = None
        if self.hist_c is not None and self.bins is not None:
            half = self.bins // 2
            histogram = {
                "bins": self.bins,
                "c_edges": np.linspace(-1.0, 1.0, self.bins + 1),
                "c_counts": np.asarray(self.hist_c, dtype=np.int64),
                "c2_edges": (np.arange(half + 1, dtype=np.float64) / half) ** 2,
                "c2_counts": _fold_abs(np.asarray(self.hist_c, dtype=np.int64)),
            }
        return {
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "n_used": self.n_used,
            "n_zero_rows": self.n_zero_rows,
            "n_excluded": self.n_excluded,
            "pairs": self.pairs,
            "exact": self.exact,
            "seed": self.seed,
            "mean_c2": self.mean_c2,
            "std_c2": self.std_c2,
            "quantiles_c2": {f"{q:g}": v for q, v in zip(self.quantile_levels, self.quantiles_c2, strict=True)},
            "frac_abs_c_gt_0_3": self.frac_abs_c_gt_0_3,
            "frac_abs_c_gt_0_5": self.frac_abs_c_gt_0_5,
            "ks_gauss": self.ks_gauss,
            "ks_exp": self.ks_exp,
            "ks_resolution": self.ks_resolution,
            "bulk_index": self.bulk_index,
            "bulk_index_sign": "positive -> class A (Gaussian fits better), negative -> class B",
            "class": self.bulk_class,
            "lora_sufficient": self.lora_sufficient,
            "lora_lr": self.lora_lr,
            "h_class": self.h_class,
            "h_class_source": "empirical class means from paper 002 (h_A = 1.69, h_B = 10.0), not derived",
            "predicted_critical_lora_lr": self.predicted_critical_lora_lr,
            "tied_head": self.tied_head,
            "uncertainty": self.uncertainty,
            "histogram_c2": self.histogram_c2,
            "quantile_levels": np.asarray(self.quantile_levels, dtype=np.float64),
            "c": {"mean": self.mean_c, "std": self.std_c,
                  "quantiles": np.asarray(self.quantiles_c, dtype=np.float64)},
            "c2": {"mean": self.mean_c2, "std": self.std_c2,
                   "quantiles": np.asarray(self.quantiles_c2, dtype=np.float64)},
            "histogram": histogram,
        }

    @staticmethod
    def _uncertainty_tree(uncertainty: dict | None) -> dict:
        if uncertainty is None:
            return {}
        from ckptaudit.analyses.embeddings.uncertainty import hdf5_tree

        return {"uncertainty": hdf5_tree(uncertainty)}


# --------------------------------------------------------------------------------------------------------------
# The analysis


def normalised_rows(E: torch.Tensor, exclude: set[int] | None = None) -> tuple[torch.Tensor, int, int]:
    """Unit-norm rows of ``E`` [V, d] (float32), without excluded ids and zero rows.

    Returns ``(rows [n_used, d], n_zero_rows, n_excluded)``. Zero rows have no direction, so they are dropped
    (and counted) rather than producing NaN overlaps.
    """
    if E.ndim != 2:
        raise DataError(f"embedding matrix must be 2-D [vocab, dim], got shape {tuple(E.shape)}")
    keep = torch.ones(E.shape[0], dtype=torch.bool)
    n_excluded = 0
    if exclude:
        ids = torch.tensor(sorted(i for i in exclude if 0 <= i < E.shape[0]), dtype=torch.long)
        keep[ids] = False
        n_excluded = int(ids.numel())
    # Norms accumulated in float64 (no float64 copy of E) so that bf16/fp16 rows do not under/overflow.
    norms = torch.linalg.vector_norm(E.detach(), dim=1, dtype=torch.float64).cpu()
    zero = (norms == 0) & keep
    keep &= ~zero
    rows = E.detach()[keep.to(E.device)].to(torch.float32)
    rows /= norms[keep].to(device=rows.device, dtype=torch.float32).unsqueeze(1)
    return rows, int(zero.sum()), n_excluded


def overlap_stats(
    E: torch.Tensor,
    pairs: int = 200_000,
    exact: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    tile: int = 4096,
    bins: int = DEFAULT_BINS,
    exclude: set[int] | None = None,
    progress: Callable[[float], None] | None = None,
    lora_lr: float = DEFAULT_LORA_LR,
    tied_head: bool | None = None,
    bootstrap: int = 0,
) -> EmbeddingClassResult:
    """Overlap statistics, KS distances and class of the embedding matrix ``E`` [V, d] (any float dtype).

    ``pairs``: number of sampled ordered pairs (sampled mode). ``exact``: all pairs, tiled (``tile`` rows per
    side; memory ~ 3 * tile^2 * 4 bytes) into ``bins`` uniform c-bins on [-1, 1] (even). ``exclude``: token ids
    left out (special/unused tokens). ``progress(n)`` is advanced by the number of pairs done (total: ``pairs``
    sampled, ``n_used * (n_used - 1) / 2`` exact). ``lora_lr`` is the intended LoRA learning rate for the
    predicted critical rate. Deterministic given ``seed`` (sampled) and independent of it (exact). Sampled mode
    also reports standard errors and, with ``bootstrap`` >= 2 replicates (seeded by ``seed``), bootstrap intervals
    of every statistic (``uncertainty``; :mod:`ckptaudit.analyses.embeddings.uncertainty`).
    """
    V, d = (int(x) for x in E.shape) if E.ndim == 2 else (0, 0)
    rows, n_zero, n_excl = normalised_rows(E, exclude)
    n = rows.shape[0]
    if n < 2:
        raise DataError(
            f"embedding matrix {tuple(E.shape)} has {n} usable rows after excluding {n_excl} ids and {n_zero} zero "
            "rows; at least 2 are needed", "check $tokens_from and the tensor chosen as embedding", param="tokens_from")
    rows = rows.to(device)
    if exact:
        if bins < 2 or bins % 2:
            raise DataError(f"bins must be an even number >= 2, got {bins}")
        stats = _exact_stats(rows, tile=tile, bins=bins, progress=progress)
    else:
        if not 2 <= pairs <= MAX_PAIRS:
            raise DataError(f"pairs must lie in [2, {MAX_PAIRS:,}], got {pairs:,}",
                            "the default 200,000 pairs already pin the statistics to ~0.002")
        stats = _sampled_stats(rows, pairs=pairs, seed=seed, progress=progress)
    bulk_class = "A" if stats["ks_gauss"] < stats["ks_exp"] else "B"
    from ckptaudit.analyses.embeddings.uncertainty import EXACT, sampled_uncertainty

    sample = stats.pop("_c", None)
    stats["histogram_c2"] = (display_histogram_folded(stats["hist_c"]) if exact
                             else display_histogram(sample * sample))
    stats["uncertainty"] = dict(EXACT) if exact else sampled_uncertainty(sample, bulk_class, QUANTILE_LEVELS,
                                                                          n_boot=bootstrap, seed=seed)
    h = H_CLASS[bulk_class]
    return EmbeddingClassResult(
        vocab_size=V, dim=d, n_used=n, n_zero_rows=n_zero, n_excluded=n_excl, exact=exact, seed=seed,
        bulk_index=stats["ks_exp"] - stats["ks_gauss"], bulk_class=bulk_class,
        # Paper 002 §6: LoRA suffices for class B; in class A it fails on high-overlap targets.
        lora_sufficient=bulk_class == "B", lora_lr=float(lora_lr), h_class=h,
        predicted_critical_lora_lr=float(lora_lr) / h, tied_head=tied_head, **stats,
    )


def _sampled_stats(rows: torch.Tensor, pairs: int, seed: int, progress) -> dict:
    from scipy import stats as sps

    n = rows.shape[0]
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    i = torch.randint(0, n, (pairs,), generator=g)
    # j uniform over the n - 1 rows other than i: draw from [0, n-1) and skip i.
    j = torch.randint(0, n - 1, (pairs,), generator=g)
    j += (j >= i).long()
    c = torch.empty(pairs, dtype=torch.float64)
    chunk = 1 << 13  # bounds the gathered [chunk, d] buffers (3 x chunk x d floats)
    for a in range(0, pairs, chunk):
        ii, jj = i[a:a + chunk].to(rows.device), j[a:a + chunk].to(rows.device)
        c[a:a + chunk] = (rows[ii] * rows[jj]).sum(dim=1).double().cpu()
        if progress is not None:
            progress(min(chunk, pairs - a))
    c_np = c.numpy()
    s_np = c_np * c_np
    mean_s, std_s = float(s_np.mean()), float(s_np.std())
    # Frozen distributions, not names with args: some scipy releases pass the args to the bare ufunc and fail.
    ks_gauss = float(sps.kstest(s_np, sps.norm(mean_s, std_s).cdf).statistic) if std_s > 0 else 1.0
    ks_exp = float(sps.kstest(s_np, sps.expon(0.0, mean_s).cdf).statistic) if mean_s > 0 else 1.0
    return {
        "pairs": pairs,
        "mean_c": float(c_np.mean()), "std_c": float(c_np.std()),
        "quantiles_c": tuple(float(x) for x in np.quantile(c_np, QUANTILE_LEVELS)),
        "mean_c2": mean_s, "std_c2": std_s,
        "quantiles_c2": tuple(float(x) for x in np.quantile(s_np, QUANTILE_LEVELS)),
        "frac_abs_c_gt_0_3": float(np.count_nonzero(s_np > _THRESHOLDS[0] ** 2)) / pairs,
        "frac_abs_c_gt_0_5": float(np.count_nonzero(s_np > _THRESHOLDS[1] ** 2)) / pairs,
        "ks_gauss": ks_gauss, "ks_exp": ks_exp,
        "_c": c_np,  # the sample itself, for the uncertainty (not kept in the result)
    }


_SUM_CHUNK = 1 << 20


def _exact_stats(rows: torch.Tensor, tile: int, bins: int, progress) -> dict:
    n = rows.shape[0]
    dev = rows.device
    hist = torch.zeros(bins, dtype=torch.int64, device=dev)
    sum_c = sum_s = sum_s2 = 0.0
    cnt = [0, 0]
    thr2 = [t * t for t in _THRESHOLDS]
    half = bins / 2.0
    buf = None
    masks: dict = {}
    starts = list(range(0, n, tile))
    for a in starts:
        A = rows[a:a + tile]
        for b in starts:
            if b < a:
                continue
            B = rows[b:b + tile]
            shape = (A.shape[0], B.shape[0])
            if buf is None or buf.shape != shape:
                buf = torch.empty(shape, dtype=torch.float32, device=dev)
            torch.mm(A, B.T, out=buf)
            if a == b:
                # Diagonal tile: strict upper triangle only (each unordered pair once, no self-overlap).
                if shape not in masks:
                    masks[shape] = torch.ones(shape, dtype=torch.bool, device=dev).triu_(1)
                vals = buf[masks[shape]]
            else:
                vals = buf.view(-1)
            m = vals.numel()
            if m == 0:
                continue
            # c, c^2 and c^4 summed in float64, in pieces of _SUM_CHUNK values (no float64 copy of the tile).
            for lo in range(0, m, _SUM_CHUNK):
                c64 = vals[lo : lo + _SUM_CHUNK].to(torch.float64)
                s64 = c64 * c64
                sum_c += float(c64.sum())
                sum_s += float(s64.sum())
                sum_s2 += float(torch.dot(s64, s64))
                cnt[0] += int(torch.count_nonzero(s64 > thr2[0]))
                cnt[1] += int(torch.count_nonzero(s64 > thr2[1]))
                del c64, s64
            # Bin index floor((c + 1) * bins / 2) computed in place (vals is dead after this).
            idx = vals.add_(1.0).mul_(half).to(torch.int32).clamp_(0, bins - 1)
            hist += torch.bincount(idx, minlength=bins)
            del idx, vals
            if progress is not None:
                progress(m)
    N = n * (n - 1) // 2
    h = hist.cpu().numpy().astype(np.int64)
    assert int(h.sum()) == N, "histogram lost pairs"
    mean_c, mean_s = sum_c / N, sum_s / N
    std_c = math.sqrt(max(sum_s / N - mean_c * mean_c, 0.0))
    std_s = math.sqrt(max(sum_s2 / N - mean_s * mean_s, 0.0))
    c_edges = np.linspace(-1.0, 1.0, bins + 1)
    s_edges = (np.arange(bins // 2 + 1, dtype=np.float64) / (bins // 2)) ** 2
    s_counts = _fold_abs(h)
    ks_gauss, res_g = _ks_from_histogram(s_edges, s_counts, "norm", mean_s, std_s)
    ks_exp, res_e = _ks_from_histogram(s_edges, s_counts, "expon", mean_s, std_s)
    return {
        "pairs": N,
        "mean_c": mean_c, "std_c": std_c,
        "quantiles_c": _hist_quantiles(c_edges, h, QUANTILE_LEVELS),
        "mean_c2": mean_s, "std_c2": std_s,
        "quantiles_c2": _hist_quantiles(s_edges, s_counts, QUANTILE_LEVELS),
        "frac_abs_c_gt_0_3": cnt[0] / N, "frac_abs_c_gt_0_5": cnt[1] / N,
        "ks_gauss": ks_gauss, "ks_exp": ks_exp,
        "bins": bins, "ks_resolution": max(res_g, res_e), "hist_c": h,
    }


def display_histogram(s: np.ndarray, bins: int = DISPLAY_BINS, q: float = DISPLAY_QUANTILE) -> dict:
    """Histogram of squared overlaps ``s`` (sampled values, dimensionless): ``bins`` uniform bins on [0, the ``q``
    quantile of s] (numpy's rule: the last bin holds its right edge), and ``above``, the count beyond that range.
    ``counts`` plus ``above`` is the number of values."""
    s = np.asarray(s, dtype=np.float64)
    hi = float(np.quantile(s, q))
    if not hi > 0.0:
        hi = float(s.max()) if s.max() > 0 else 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    counts = np.histogram(s, edges)[0]
    return {"edges": edges.tolist(), "counts": counts.astype(np.int64).tolist(),
            "above": int(s.size - counts.sum()), "range_quantile": q}


def display_histogram_folded(hist_c: np.ndarray, bins: int = DISPLAY_BINS, q: float = DISPLAY_QUANTILE) -> dict:
    """The same histogram from the exact mode's counts per c-bin: the edges of about ``bins`` uniform bins on
    [0, the ``q`` quantile of s] are moved to the nearest edges ``(k * 2/len(hist_c))^2`` of the folded |c| bins,
    so every count is exact (the bins are uniform to within one fine bin)."""
    counts_abs = _fold_abs(np.asarray(hist_c, dtype=np.int64))
    half = counts_abs.shape[0]
    fine = (np.arange(half + 1, dtype=np.float64) / half) ** 2
    hi = _hist_quantiles(fine, counts_abs, (q,))[0]
    k_hi = min(half, max(1, math.ceil(math.sqrt(hi) * half)))
    k = np.unique(np.rint(np.sqrt(np.linspace(0.0, fine[k_hi], bins + 1)) * half).astype(np.int64))
    cum = np.concatenate([[0], np.cumsum(counts_abs)])
    return {"edges": fine[k].tolist(), "counts": (cum[k[1:]] - cum[k[:-1]]).tolist(),
            "above": int(cum[-1] - cum[k[-1]]), "range_quantile": q}


def _fold_abs(hist_c: np.ndarray) -> np.ndarray:
    """Counts per |c|-bin [k, k+1) * 2/bins from counts per symmetric c-bin on [-1, 1]."""
    half = hist_c.shape[0] // 2
    return hist_c[half:] + hist_c[:half][::-1]


def _hist_quantiles(edges: np.ndarray, counts: np.ndarray, levels) -> tuple[float, ...]:
    """Quantiles from a histogram, linear inside a bin (exact to within one bin width)."""
    cdf = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)]) / float(counts.sum())
    out = []
    for q in levels:
        k = int(np.searchsorted(cdf, q, side="left"))
        k = min(max(k, 1), len(edges) - 1)
        lo, hi = cdf[k - 1], cdf[k]
        frac = 0.0 if hi <= lo else (q - lo) / (hi - lo)
        out.append(float(edges[k - 1] + frac * (edges[k] - edges[k - 1])))
    return tuple(out)


def _ks_from_histogram(edges, counts, dist: str, mean: float, std: float) -> tuple[float, float]:
    """KS distance between a histogrammed sample and a fitted CDF, evaluated at the bin edges.

    Returns ``(ks_at_edges, resolution)``: the true sup-distance lies in ``[ks, ks + resolution]`` where
    ``resolution`` is the largest within-bin increment of either CDF (both are monotone inside a bin).
    """
    from scipy import stats as sps

    emp = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)]) / float(counts.sum())
    if dist == "norm":
        fit = sps.norm.cdf(edges, loc=mean, scale=std) if std > 0 else (edges >= mean).astype(np.float64)
        below = float(sps.norm.cdf(0.0, loc=mean, scale=std)) if std > 0 else 0.0
    else:
        fit = sps.expon.cdf(edges, loc=0.0, scale=mean) if mean > 0 else np.ones_like(edges)
        below = 0.0
    # Just below s = 0 the empirical CDF is 0 while the fitted Gaussian already holds Phi(-mean/std): that jump
    # is part of the sup (kstest on a sample sees it at the smallest value).
    ks = max(float(np.max(np.abs(emp - fit))), below)
    upper = max(float(np.max(np.abs(emp[1:] - fit[:-1]))), float(np.max(np.abs(fit[1:] - emp[:-1]))), below)
    return ks, upper - ks


# --------------------------------------------------------------------------------------------------------------
# Reading the embedding matrices of a model

# Name suffixes, most specific first, used when the architecture registry cannot place the tensors.
_EMBED_NAMES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight",
                "tok_embeddings.weight", "token_embd.weight", "shared.weight", "embeddings.weight")
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")  # "output.weight": GGUF, exact name only


def embedding_tensor_names(shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> dict[str, str]:
    """Names of the input-embedding tensor (``"embed"``) and of the LM head (``"head"``, when present).

    Uses ``io.roles.resolve_architecture`` when that registry places them, else well-known name suffixes.
    Raises ``UnknownArchitectureError`` when no 2-D embedding tensor is found.
    """
    found: dict[str, str] = {}
    from ckptaudit.io.roles import resolve_architecture

    try:
        arch = resolve_architecture(shapes, config)
    except UnknownArchitectureError:
        arch = None  # e.g. GGUF names; fall back to the well-known names below
    for piece in arch.pieces if arch is not None else ():
        if piece.role in ("embed", "head") and not piece.is_bias and piece.role not in found:
            if len(shapes.get(piece.tensor, ())) == 2:
                found[piece.role] = piece.tensor
    for role, suffixes in (("embed", _EMBED_NAMES), ("head", _HEAD_NAMES)):
        if role in found:
            continue
        for suf in suffixes:
            loose = role == "embed" or suf != "output.weight"
            hits = [k for k in shapes if (k == suf or (loose and k.endswith("." + suf))) and len(shapes[k]) == 2]
            # Prefer the shortest name: "model.embed_tokens.weight" over e.g. a nested "vision...embed..." one.
            if hits:
                found[role] = min(hits, key=len)
                break
    if "head" in found and "embed" in found and shapes[found["head"]][1:] != shapes[found["embed"]][1:]:
        del found["head"]  # not a vocabulary readout of the same width
    if "embed" not in found:
        listed = ", ".join(sorted(shapes)[:12])
        raise UnknownArchitectureError(
            f"no input-embedding tensor found among {len(shapes)} tensors ({listed}{', ...' if len(shapes) > 12 else ''})",
            "pass a role map that assigns role 'embed' to the token-embedding tensor")
    return found


def embedding_matrices(model_path: str | Path) -> dict[str, torch.Tensor]:
    """The input embedding [V, d] and, when untied, the LM head [V, d] of a model (only these tensors are read).

    ``model_path``: a model directory, a weight file (safetensors, GGUF, ...) or a hub id already in the local
    cache (resolved by ``io.models.resolve_model_path``; an uncached id raises ``HubNotCachedError``). Returns
    ``{"embed": E}`` or ``{"embed": E, "head": H}``; the head counts as tied (and is left out) when it is absent
    or bit-identical to the embedding. Tensors are in their stored dtype (GGUF dequantised), on the CPU.
    """
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import resolve_model_path

    path = Path(resolve_model_path(str(model_path)))
    # The checkpoint every model command reads from this path (full-precision weights over a GGUF export).
    ckpt = discover_run(path).checkpoints[-1]
    with ckpt.tensors() as src:
        shapes = {k: tuple(src.shape(k)) for k in src.keys()}
        config = ckpt.config()
        names = embedding_tensor_names(shapes, config)
        out = {"embed": src.get(names["embed"])}
        if "head" in names and names["head"] != names["embed"]:
            H = src.get(names["head"])
            if H.shape != out["embed"].shape or not torch.equal(H, out["embed"]):
                out["head"] = H
    return out
