"""Near-synonym density-matrix observables at one prediction (SPEC §6, born-gap; paper 002 sections 2, 4, 5).

At the last position of a context the model gives logits ``z`` [V] and probabilities ``p = softmax(z)``. The pool
``P`` is the smallest set of tokens whose cumulative probability reaches the nucleus mass, plus the target ``y``
and the competitor ``c`` forced in; ``p`` is renormalised on ``P``. Overlaps ``c_ij`` are cosines between the
unembedding rows of ``i`` and ``j`` (the input embeddings when the head is tied, the LM-head rows otherwise).

With the density matrix ``rho = sum_{i in P} p_i |u_i><u_i|`` (unit rows ``u_i``):

* Born score ``P_B(k) = <u_k|rho|u_k> = sum_i p_i c_ik^2``; Born gap ``phi = P_B(y) - P_B(c)``.
* ``phi = S + D`` with signal ``S = (1 - c_yc^2)(p_y - p_c)`` and drag ``D = sum_{i in P\\{y,c}} p_i (c_iy^2 - c_ic^2)``.
* purity ``gamma = tr(rho^2) = sum_ij p_i p_j c_ij^2``, participation ratio ``PR = 1/gamma``, classical
  ``IPR = sum_i p_i^2``.
* localisation length ``xi = sqrt(sum_ij p_i p_j theta_ij^2)`` (radians), ``theta = arccos(clip(c, -1, 1))``;
  burial depth ``B = xi / theta_yc``; geometric efficiency ``eta_geo = c_yc^2 / sum_{i in P\\{y}} c_iy^2``.

Ranks are competition ranks inside the pool: ``1 + #{k in P : score_k > score_y}`` (1 = top), by ``P_B`` (Born
rank) and by ``p`` (softmax rank). Everything is computed in float64; cost is O(|P| d^2) for the Born scores and
purity (through the d x d matrix rho) and O(|P|^2 d) for ``xi`` (streamed in row blocks, never |P| x |P| at once).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptaudit.errors import DataError, InputNotFoundError
from ckptaudit.io.jsonio import loads_bounded
from ckptaudit.report.tree import TreeResult

DEFAULT_NUCLEUS = 0.9
_XI_BLOCK = 2048  # rows of the pool per block of the O(|P|^2) angle sum


@dataclass(frozen=True)
class Context:
    """One near-synonym context: the text before the target, the target token text, an optional competitor."""

    context: str
    target: str
    competitor: str | None = None
    where: str = field(default="", compare=False)  # "FILE:LINE" of the contexts file it came from


@dataclass(frozen=True)
class BornObservables:
    """Observables of one prediction (see the module docstring). Token ids index the vocabulary.

    ``pool`` [|P|] token ids in decreasing ``p``; ``p_pool`` [|P|] renormalised probabilities; ``born_scores``
    [|P|] Born scores ``P_B`` of the pool tokens. ``decomposition_residual = |phi - (signal + drag)|``.
    """

    target: int
    competitor: int
    competitor_given: bool
    pool_size: int
    p_y: float
    p_c: float
    c_yc: float
    phi: float
    signal: float
    drag: float
    decomposition_residual: float
    throttle: float
    logit_gap: float
    purity: float
    pr: float
    ipr: float
    xi: float
    theta_yc: float
    burial_depth: float
    eta_geo: float
    born_rank: int | None  # over the whole vocabulary; None when not asked for (vocab_ranks=False)
    softmax_rank: int | None
    phi_ablated: float
    pool: np.ndarray = field(compare=False, repr=False)
    p_pool: np.ndarray = field(compare=False, repr=False)
    born_scores: np.ndarray = field(compare=False, repr=False)


def nucleus_pool(p: torch.Tensor, nucleus: float, forced: Iterable[int] = ()) -> torch.Tensor:
    """Token ids of the smallest top-probability set with cumulative mass >= ``nucleus``, plus ``forced`` ids.

    Ordered by decreasing probability (ties by id), forced ids appended when not already in. ``p`` [V].
    """
    if not 0.0 < nucleus <= 1.0:
        raise DataError(f"nucleus must be in (0, 1], got {nucleus}")
    order = torch.argsort(-p.double(), stable=True)
    cum = torch.cumsum(p.double()[order], 0)
    # Smallest k with cum[k-1] >= nucleus; float round-off may leave the total just under 1.0.
    k = int(torch.searchsorted(cum, torch.tensor([min(nucleus, float(cum[-1]))], dtype=cum.dtype))[0]) + 1
    pool = order[: min(k, order.numel())].tolist()
    seen = set(pool)
    for t in forced:
        if int(t) not in seen:
            pool.append(int(t))
            seen.add(int(t))
    return torch.tensor(pool, dtype=torch.long)


def born_observables(
    p: torch.Tensor,
    z: torch.Tensor,
    U: torch.Tensor,
    target: int,
    competitor: int | None = None,
    nucleus: float = DEFAULT_NUCLEUS,
    vocab_ranks: bool = True,
) -> BornObservables:
    """Density-matrix observables of one prediction.

    ``p`` [V] probabilities (need not be renormalised), ``z`` [V] logits (for the logit gap), ``U`` [V, d]
    unembedding rows (normalised here), ``target`` and optional ``competitor`` token ids. When ``competitor``
    is None it is the pool token ``j != y`` with the largest cosine ``c_yj`` to the target.

    Ranks of y are over the whole vocabulary: the softmax rank by p, the Born rank by P_B(k) = sum_{i in P} p_i c_ik^2
    for every token k (|P| x V overlaps, computed in row blocks; a zero row scores 0). ``vocab_ranks=False`` skips
    them (None), for callers that observe every training step and report no rank.
    """
    V = p.shape[0]
    if U.shape[0] < V:
        raise DataError(f"unembedding has {U.shape[0]} rows but the distribution has {V} entries")
    for name, t in (("target", target), ("competitor", competitor)):
        if t is not None and not 0 <= int(t) < V:
            raise DataError(f"{name} token id {t} is outside the vocabulary [0, {V})")
    y = int(target)
    forced = [y] if competitor is None else [y, int(competitor)]
    pool = nucleus_pool(p.detach().cpu(), nucleus, forced)
    Up = U.detach()[pool.to(U.device)].to(torch.float64).cpu()
    norms = Up.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        bad = pool[(norms[:, 0] == 0)].tolist()
        raise DataError(f"unembedding rows of token ids {bad[:5]} are zero: overlaps undefined")
    Up = Up / norms
    iy = pool.tolist().index(y)
    cy = Up @ Up[iy]  # c_iy for i in P
    given = competitor is not None
    if given:
        ic = pool.tolist().index(int(competitor))
        if ic == iy:
            raise DataError(f"competitor token id {competitor} is the target itself")
    else:
        if pool.numel() < 2:
            raise DataError("the pool holds only the target: no competitor to choose", "lower $nucleus", param="nucleus")
        masked = cy.clone()
        masked[iy] = -math.inf
        ic = int(torch.argmax(masked))
    w = p.detach().cpu().to(torch.float64)[pool]
    if float(w.sum()) <= 0:
        raise DataError("the pool has zero probability mass")
    w = w / w.sum()
    zz = z.detach().cpu().to(torch.float64)
    obs = _pool_observables(w, Up, iy, ic)
    # Competitor ablation: remove its mass, renormalise, recompute the Born gap.
    w_abl = w.clone()
    w_abl[ic] = 0.0
    phi_abl = float("nan")
    if float(w_abl.sum()) > 0:
        w_abl = w_abl / w_abl.sum()
        rho_abl = (Up * w_abl[:, None]).T @ Up
        phi_abl = float(Up[iy] @ rho_abl @ Up[iy] - Up[ic] @ rho_abl @ Up[ic])
    born = obs.pop("born_scores")
    return BornObservables(
        target=y, competitor=int(pool[ic]), competitor_given=given, pool_size=int(pool.numel()),
        logit_gap=float(zz[y] - zz[int(pool[ic])]),
        born_rank=_vocab_born_rank(U[:V], w, Up, y) if vocab_ranks else None,
        softmax_rank=1 + int((p.detach().cpu().double() > float(p[y])).sum()) if vocab_ranks else None,
        phi_ablated=phi_abl, pool=pool.numpy(), p_pool=w.numpy(), born_scores=born.numpy(), **obs,
    )


def _vocab_born_rank(U: torch.Tensor, w: torch.Tensor, Up: torch.Tensor, y: int, block: int = 8192) -> int:
    """1 + #{k in V : P_B(k) > P_B(y)}, P_B(k) = sum_i w_i (u_i . u_k / |u_k|)^2 over the pool rows ``Up``."""

    rho = (Up * w[:, None]).T @ Up if Up.shape[0] > Up.shape[1] else None  # d x d when the pool is wider than d

    def scores(rows: torch.Tensor) -> torch.Tensor:
        r = rows.detach().to("cpu", torch.float64)
        n = r.norm(dim=1, keepdim=True)
        r = r / torch.where(n > 0, n, torch.ones_like(n))
        if rho is not None:  # u_k^T rho u_k: b x d x d work instead of b x |P| x d
            return ((r @ rho) * r).sum(dim=1)
        c = r @ Up.T  # [b, |P|]
        return (c * c) @ w

    # One pass, one formula for every token (y included), so y is never compared with itself at other rounding.
    pb = torch.cat([scores(U[a : a + block]) for a in range(0, U.shape[0], block)])
    return 1 + int((pb > pb[y]).sum())


def _pool_observables(w: torch.Tensor, Up: torch.Tensor, iy: int, ic: int) -> dict:
    """Observables from renormalised pool probabilities ``w`` [n] and unit rows ``Up`` [n, d] (float64)."""
    rho = (Up * w[:, None]).T @ Up  # d x d
    born = ((Up @ rho) * Up).sum(dim=1)  # <u_k|rho|u_k>
    cy, cc = Up @ Up[iy], Up @ Up[ic]
    c_yc = float(cy[ic])
    throttle = 1.0 - c_yc * c_yc
    py, pc = float(w[iy]), float(w[ic])
    phi = float(born[iy] - born[ic])
    signal = throttle * (py - pc)
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[[iy, ic]] = False
    drag = float((w[rest] * (cy[rest] ** 2 - cc[rest] ** 2)).sum())
    purity = float((rho * rho).sum())  # tr(rho^2) for symmetric rho
    theta_yc = math.acos(min(1.0, max(-1.0, c_yc)))
    xi = math.sqrt(max(_weighted_angle_sq(w, Up), 0.0))
    not_y = torch.ones_like(w, dtype=torch.bool)
    not_y[iy] = False
    denom = float((cy[not_y] ** 2).sum())
    return {
        "p_y": py, "p_c": pc, "c_yc": c_yc, "phi": phi, "signal": signal, "drag": drag,
        "decomposition_residual": abs(phi - (signal + drag)), "throttle": throttle,
        "purity": purity, "pr": 1.0 / purity if purity > 0 else math.inf, "ipr": float((w * w).sum()),
        "xi": xi, "theta_yc": theta_yc, "burial_depth": xi / theta_yc if theta_yc > 0 else math.inf,
        "eta_geo": c_yc * c_yc / denom if denom > 0 else math.nan, "born_scores": born,
    }


def _weighted_angle_sq(w: torch.Tensor, Up: torch.Tensor) -> float:
    """sum_ij w_i w_j arccos(clip(c_ij))^2, in row blocks so memory stays O(block x |P|)."""
    total = 0.0
    n = Up.shape[0]
    for a in range(0, n, _XI_BLOCK):
        C = (Up[a:a + _XI_BLOCK] @ Up.T).clamp_(-1.0, 1.0)
        th = torch.arccos(C)
        # The diagonal is exactly 0 in theory; round-off would add ~1e-8 rad per entry.
        idx = torch.arange(a, min(a + _XI_BLOCK, n))
        th[idx - a, idx] = 0.0
        total += float(w[a:a + _XI_BLOCK] @ (th * th) @ w)
    return total


# --------------------------------------------------------------------------------------------------------------
# Contexts and the model run


#: The observables of one context in the ``--json`` document, in this order; the report holds every field.
_JSON_OBSERVABLES = ("pool_size", "phi", "signal", "drag", "throttle", "logit_gap", "purity", "pr", "ipr", "xi",
                     "burial_depth", "eta_geo", "born_rank", "softmax_rank", "phi_ablated")


@dataclass(frozen=True)
class ContextObservables(TreeResult):
    """One context of born-gap with its decoded target and competitor texts and its observables."""

    context: Context
    target_text: str
    competitor_text: str
    observables: BornObservables

    HDF5_ONLY = frozenset({"competitor_given", "p_y", "p_c", "c_yc", "decomposition_residual", "theta_yc", "pool",
                           "p_pool", "born_scores"})
    # --json names the target and competitor by text; the report by token id, with the texts beside them.
    HDF5_LAYOUT = {"target": "_target", "competitor": "_competitor"}

    def to_tree(self) -> dict:
        """Keys (--json, fixed by issue 7): context, target, competitor (texts), pool_size, phi, signal, drag,
        throttle, logit_gap, purity, pr, ipr, xi, burial_depth, eta_geo, born_rank, softmax_rank, phi_ablated;
        the report adds the other BornObservables fields and the pool arrays pool (token ids), p_pool,
        born_scores."""
        o = self.observables
        d = {"context": self.context.context, "target": self.target_text, "competitor": self.competitor_text}
        d.update({k: getattr(o, k) for k in _JSON_OBSERVABLES})
        d.update({k: v for k, v in asdict(o).items() if k in self.HDF5_ONLY})
        d["pool"] = np.asarray(o.pool, dtype=np.int64)
        return d

    def _target(self, text: str) -> dict:
        return {"target": self.observables.target, "target_text": text}

    def _competitor(self, text: str) -> dict:
        return {"competitor": self.observables.competitor, "competitor_text": text}


@dataclass(frozen=True)
class BornGapResult(TreeResult):
    """born-gap over a contexts file. ``unembedding`` says whose rows the overlaps use."""

    unembedding: str  # "input_embeddings (tied head)" or "lm_head (untied)"
    nucleus: float
    contexts: tuple[Context, ...]
    target_texts: tuple[str, ...]
    competitor_texts: tuple[str, ...]
    observables: tuple[BornObservables, ...]
    skipped: tuple[dict, ...] = ()  # the unusable contexts (usable_contexts), by file line

    HDF5_ONLY = frozenset({"nucleus"})
    HDF5_LAYOUT = {"skipped_contexts": "_skipped_json"}  # JSON text in the report

    def to_tree(self) -> dict:
        """The ``--json`` payload: ``contexts`` (one ContextObservables each), which rows gave the overlaps
        (``unembedding``) and the unusable contexts (``skipped_contexts``); the report adds ``nucleus``."""
        rows = [ContextObservables(ctx, tgt, comp, o) for ctx, tgt, comp, o in
                zip(self.contexts, self.target_texts, self.competitor_texts, self.observables, strict=True)]
        return {"unembedding": self.unembedding, "nucleus": self.nucleus, "contexts": rows,
                "skipped_contexts": list(self.skipped)}

    @staticmethod
    def _skipped_json(skipped: list[dict]) -> dict:
        return skipped_contexts_json(skipped)


def skipped_contexts_json(skipped: list[dict]) -> dict:
    """The report's form of ``skipped_contexts``: the dataset ``skipped_contexts_json``, JSON text."""
    return {"skipped_contexts_json": json.dumps(skipped)}


def load_contexts(path: str | Path) -> list[Context]:
    """Read a contexts JSONL file: one ``{"context", "target", "competitor"?}`` object per line.

    Blank lines are skipped. Any malformed line raises ``DataError`` naming the file and line number.
    """
    from ckptaudit.io.bundled import contexts_file

    path = contexts_file(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such contexts file",
                                 "pass a JSONL file of {context, target, competitor}, or $contexts=near-synonyms "
                                 "(the ten pairs shipped with ckptaudit)", param="contexts")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {e.start} of the file)",
                        "save the contexts file as UTF-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        obj = loads_bounded(line, where, error=DataError, hint="one JSON object per line")
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"context", "target", "competitor"}
        if unknown:
            raise DataError(f"{where}: unknown keys {sorted(unknown)}", "allowed: context, target, competitor")
        for key in ("context", "target"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise DataError(f"{where}: '{key}' must be a non-empty string")
        comp = obj.get("competitor")
        if comp is not None and (not isinstance(comp, str) or not comp):
            raise DataError(f"{where}: 'competitor' must be a non-empty string when given")
        out.append(Context(obj["context"], obj["target"], comp, where))
    if not out:
        raise DataError(f"{path}: no contexts", "add at least one JSON line")
    return out


def single_token_id(tokenizer, word: str, role: str = "target") -> int:
    """The id of ``word`` when the tokenizer encodes it as exactly one (known) token; ``DataError`` otherwise."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DataError(
            f"{role} {word!r} is {len(ids)} tokens for this tokenizer ({pieces}), not one",
            "choose a word that is a single token (mind the leading space)")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and word.strip() != str(tokenizer.unk_token):
        raise DataError(f"{role} {word!r} is the unknown token for this tokenizer", "choose a word in its vocabulary")
    return int(ids[0])


def context_token_ids(tokenizer, ctx: Context) -> tuple[int, int | None]:
    """(target id, competitor id or None) of a context: each one token (:func:`single_token_id`), and distinct."""
    y = single_token_id(tokenizer, ctx.target, "target")
    c = None if ctx.competitor is None else single_token_id(tokenizer, ctx.competitor, "competitor")
    if c == y:
        raise DataError(f"competitor {ctx.competitor!r} is the same token as target {ctx.target!r}")
    return y, c


def usable_contexts(tokenizer, model, contexts: Sequence[Context],
                    strict: bool = False) -> tuple[list[tuple[Context, int, int | None, torch.Tensor]], list[dict]]:
    """The contexts this tokenizer and model can run, each with (target id, competitor id, input ids), and the
    others, each ``{"where": "FILE:LINE", "context", "target", "competitor", "reason"}``: a target or competitor
    that is not one token, a context longer than the model's positions. With ``strict`` the first unusable context
    is a ``DataError`` naming its line; without, it is skipped and reported, unless none is usable."""
    kept, skipped = [], []
    for ctx in contexts:
        try:
            y, c = context_token_ids(tokenizer, ctx)
            kept.append((ctx, y, c, context_input_ids(tokenizer, model, ctx)))
        except DataError as e:
            if strict:
                raise DataError(f"{ctx.where or 'context'}: {e.template}",
                                e.hint_template or "fix the line, or leave out $strict to skip it", param=e.param) from None
            skipped.append({"where": ctx.where, "context": ctx.context, "target": ctx.target,
                            "competitor": ctx.competitor, "reason": e.message})
    if not kept:
        first = skipped[0]
        raise DataError(f"no usable context ({len(skipped)} skipped; first, {first['where']}: {first['reason']})",
                        "choose targets and competitors that are single tokens for this tokenizer")
    return kept, skipped


def context_input_ids(tokenizer, model, ctx: Context) -> torch.Tensor:
    """The ``[1, L]`` token ids of a context, checked before the model runs: at least one token, and no more than
    the model's positions (a longer context would index past its position embeddings). ``DataError`` otherwise."""
    from ckptaudit.io.models import max_positions

    ids = tokenizer(ctx.context, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise DataError(f"context {ctx.context!r} encodes to no tokens")
    config = getattr(model, "config", None)
    limit = max_positions(config.to_dict() if hasattr(config, "to_dict") else None)
    if limit is not None and ids.shape[1] > limit:
        shown = ctx.context if len(ctx.context) <= 40 else ctx.context[:37] + "..."
        raise DataError(f"context {shown!r} is {ids.shape[1]} tokens, more than the model's {limit} positions",
                        f"shorten it to at most {limit} tokens")
    return ids


def unembedding_matrix(model) -> tuple[torch.Tensor, str]:
    """The rows that score the vocabulary: input embeddings when the head is tied, LM-head rows otherwise."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None:
        return emb, "input_embeddings (no head)"
    H = head.weight
    if H is emb or (H.shape == emb.shape and H.data_ptr() == emb.data_ptr()) or (
            H.shape == emb.shape and torch.equal(H, emb)):
        return emb, "input_embeddings (tied head)"
    return H, "lm_head (untied)"


@torch.no_grad()
def born_gap(
    model,
    tokenizer,
    contexts: Sequence[Context],
    nucleus: float = DEFAULT_NUCLEUS,
    device: str | torch.device = "cpu",
    progress: Callable[[float], None] | None = None,
    strict: bool = False,
) -> BornGapResult:
    """Run ``model`` on each usable context and compute ``born_observables`` at the last position.

    Targets and competitors must each be one token for ``tokenizer``: every context is checked before the model
    runs, and the unusable ones are skipped and listed in ``skipped`` by file line (``strict``: a ``DataError``
    naming the line instead; :func:`usable_contexts`). ``progress(1)`` is called per context.
    """
    prepared, skipped = usable_contexts(tokenizer, model, contexts, strict)
    contexts = [p[0] for p in prepared]
    ids = [p[1:] for p in prepared]
    model = model.to(device).eval()
    U, which = unembedding_matrix(model)
    obs, tgt_txt, comp_txt = [], [], []
    for ctx, (y, c, input_ids) in zip(contexts, ids, strict=True):
        out = model(input_ids=input_ids.to(device))
        z = out.logits[0, -1].double()
        p = torch.softmax(z, dim=-1)
        o = born_observables(p.cpu(), z.cpu(), U, y, c, nucleus)
        obs.append(o)
        tgt_txt.append(ctx.target)
        comp_txt.append(ctx.competitor if ctx.competitor is not None else tokenizer.decode([o.competitor]))
        if progress is not None:
            progress(1)
    return BornGapResult(unembedding=which, nucleus=float(nucleus), contexts=tuple(contexts),
                         target_texts=tuple(tgt_txt), competitor_texts=tuple(comp_txt), observables=tuple(obs),
                         skipped=tuple(skipped))
