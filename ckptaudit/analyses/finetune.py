"""finetune-probe: step-by-step Born-gap trajectories under single-context fine-tuning (SPEC §6; paper 002 §4–5).

For each context the model is fine-tuned, always from the same original weights, on the one next-token
cross-entropy ``-log p(y | context)`` at the last position, either through a LoRA adapter (peft, rank 8,
alpha 16, dropout 0, on the architecture's attention query/value modules) or on every parameter. The
optimizer is AdamW at the given learning rate with no weight decay (betas 0.9/0.999, eps 1e-8). Dropout is
off (the model stays in eval mode while it trains): the probe measures the deterministic drive of the CE
gradient on one example, and dropout noise would blur the step at which the Born gap flips.

Before training (step 0) and after every optimizer step the model state is evaluated once and
``born_observables`` (born_gap.py) is computed with the *current* unembedding rows, giving per step: loss,
p_y, p_c, logit gap, Phi, signal S, drag D, participation ratio PR and localisation length xi. The competitor
is the given one, or the one ``born_gap`` picks at step 0, then held fixed so every step compares the same pair.
Each step costs one forward and one backward pass: the forward that records state t also gives the gradient of
step t + 1, so the recorded loss is exactly the loss that was differentiated.

Summary rules (pure functions below, unit-tested on planted series): flip step, jump concentration ratio,
character (catapult / intermediate / drift), failure type (kinematic / structural), saturation stop steps, and
the empirical critical learning rate of a sweep.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ckptaudit.analyses.born_gap import (
    DEFAULT_NUCLEUS,
    Context,
    born_observables,
    skipped_contexts_json,
    unembedding_matrix,
    usable_contexts,
)
from ckptaudit.errors import UnknownArchitectureError, UsageError
from ckptaudit.report.tree import TreeResult

DEFAULT_STEPS = 50
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}  # the usual rates of each protocol; users pass --lr for anything else
LORA_RANK = 8
LORA_ALPHA = 16
OPTIMIZER = "AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), dropout off"
CATAPULT_RATIO = 8.0
DRIFT_RATIO = 5.0
SATURATION_REL = 0.01
SATURATION_WINDOW = 3

SERIES = ("loss", "p_y", "p_c", "logit_gap", "phi", "signal", "drag", "pr", "xi")


# --------------------------------------------------------------------------------------------------------------
# Pure summary rules


def flip_step(phi: Sequence[float]) -> int | None:
    """First step index ``t`` (0 = before training) with ``phi[t] > 0``; None when Phi never turns positive."""
    for t, v in enumerate(phi):
        if v > 0:
            return t
    return None


def jump_ratio(phi: Sequence[float]) -> float | None:
    """Jump concentration ``max_t |dPhi_t| / mean_t |dPhi_t|`` over the steps ``dPhi_t = phi[t] - phi[t-1]``.

    Ranges from 1 (every step moves Phi equally) to the number of steps (all movement in one step). None when
    there are no steps or Phi never moves.
    """
    d = np.abs(np.diff(np.asarray(phi, dtype=np.float64)))
    if d.size == 0 or not np.all(np.isfinite(d)):
        return None
    mean = float(d.mean())
    return float(d.max()) / mean if mean > 0 else None


def trajectory_character(ratio: float | None) -> str | None:
    """``catapult`` when ratio >= 8, ``drift`` when ratio <= 5, ``intermediate`` between; None without a ratio."""
    if ratio is None:
        return None
    if ratio >= CATAPULT_RATIO:
        return "catapult"
    if ratio <= DRIFT_RATIO:
        return "drift"
    return "intermediate"


def failure_type(phi: Sequence[float], drag: Sequence[float]) -> str | None:
    """Why Phi never turned positive: ``kinematic`` when the drag improved (final D > initial D, so the signal
    drive was too weak), ``structural`` when it worsened (final D < initial D: training itself loads mass onto
    tokens that vote for the competitor). An unchanged drag counts as kinematic (it did not worsen). None when
    Phi did turn positive."""
    if flip_step(phi) is not None:
        return None
    return "structural" if float(drag[-1]) < float(drag[0]) else "kinematic"


def largest_move_step(series: Sequence[float]) -> int:
    """Step ``t >= 1`` at which ``|x[t] - x[t-1]|`` is largest (the first such step); 0 for fewer than two values
    or a series with a non-finite change."""
    d = np.abs(np.diff(np.asarray(series, dtype=np.float64)))
    if d.size == 0 or not np.all(np.isfinite(d)):
        return 0
    return int(np.argmax(d)) + 1


def saturation_stop_step(
    series: Sequence[float], rel: float = SATURATION_REL, window: int = SATURATION_WINDOW, start: int = 0
) -> int | None:
    """First step ``s >= start`` after which the series changes by less than ``rel`` x its range for ``window``
    consecutive steps: ``|x[s+k] - x[s+k-1]| < rel * (max x - min x)`` for k = 1..window.

    The range is taken over the whole series. A constant series saturates at ``start``. None when no such
    plateau is reached within the series (e.g. still moving at the end).
    """
    x = np.asarray(series, dtype=np.float64)
    if x.size == 0:
        return None
    span = float(x.max() - x.min())
    if span == 0.0:
        return start if start < x.size else None
    small = np.abs(np.diff(x)) < rel * span  # small[i]: the change from step i to step i + 1
    for s in range(max(start, 0), x.size - window):
        if bool(small[s:s + window].all()):
            return s
    return None


def critical_lr(lrs: Sequence[float], flips: Sequence[int | None]) -> float | None:
    """Smallest learning rate whose run flipped (``flip_step`` not None) within the step budget.

    ``lrs`` and ``flips`` pair up one run each. None when no run flipped.
    """
    flipped = [lr for lr, f in zip(lrs, flips, strict=True) if f is not None]
    return min(flipped) if flipped else None


# --------------------------------------------------------------------------------------------------------------
# LoRA targets


def lora_targets(model: torch.nn.Module, override: Sequence[str] | None = None) -> tuple[tuple[str, ...], str | None]:
    """The module names LoRA adapts and a note for the report (None when there is nothing to say).

    ``override``: module names given by the user (``--target-modules``), each checked to exist in the model.
    Without it the ``lora_targets`` of the model's architecture file are used (the attention query/value
    modules); an unknown architecture, or one whose file names none, raises ``UnknownArchitectureError``
    pointing at ``--target-modules``.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    if override:
        names = tuple(dict.fromkeys(s.strip() for s in override if s.strip()))
        missing = [n for n in names if n not in leaves]
        if not names or missing:
            raise UsageError(f"$target_modules: no module named {missing or list(override)} in {type(model).__name__}",
                             "name the attention projections as they appear in model.named_modules() (e.g. q_proj,v_proj)",
                             param="target_modules")
        return names, "target modules given by --target-modules"
    from ckptaudit.io.roles import family_of_model

    family = family_of_model(model)
    if family is None or not family.lora_targets:
        raise UnknownArchitectureError(
            f"{type(model).__name__}: no known attention query/value modules for LoRA",
            "pass $target_modules=NAME[,NAME] (module names of the query and value projections)", param="target_modules")
    names = family.lora_targets
    missing = [n for n in names if n not in leaves]
    if missing:
        raise UnknownArchitectureError(f"{type(model).__name__} ({family.name}) has no modules named {missing}",
                                       "pass $target_modules=NAME[,NAME]", param="target_modules")
    return names, family.lora_note or None


def apply_lora(model: torch.nn.Module, targets: Sequence[str]) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA adapter (rank 8, alpha 16, dropout 0, no bias) on ``targets``, in place.

    Only the adapter's A/B matrices train; every base weight (embeddings and LM head included) is frozen.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D stores weights as [in, out]; peft needs to know to transpose.
    conv1d = any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                        target_modules=list(targets), fan_in_fan_out=conv1d)
    with warnings.catch_warnings():
        # peft calls a transformers method that transformers 5 deprecates; the notice is not the user's to act on.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------------------------
# One trajectory


@dataclass(frozen=True)
class Trajectory(TreeResult):
    """One fine-tuning run on one context. Series are float64 arrays of length ``steps + 1`` (index 0 = before
    training). ``max_abs_delta_embedding`` / ``max_abs_delta_head``: max |W_after - W_before| of the input
    embedding matrix and of an untied LM head (None when tied); ``embeddings_unchanged``: both bit-identical."""

    context: str
    target: str
    competitor: str
    target_id: int
    competitor_id: int
    mode: str
    lr: float
    steps: int
    series: dict[str, np.ndarray] = field(repr=False)
    flip_step: int | None
    jump_ratio: float | None
    character: str | None
    failure_type: str | None
    phi_stop_step: int | None
    ce_stop_step: int | None
    embeddings_unchanged: bool
    max_abs_delta_embedding: float
    max_abs_delta_head: float | None

    @property
    def pre_resolved(self) -> bool:
        """Phi was already positive before any training (the paper's 'pre-resolved' case)."""
        return self.flip_step == 0

    HDF5_ONLY = frozenset({"target_id", "competitor_id"})

    def to_tree(self) -> dict:
        """One entry of the ``contexts`` list (keys fixed by issue 7, plus the other recorded series; series as
        float64 arrays of length steps + 1); the report adds the token ids target_id and competitor_id."""
        s = self.series
        return {
            "context": self.context, "target": self.target, "competitor": self.competitor, "mode": self.mode,
            "lr": self.lr, "phi": s["phi"], "signal": s["signal"], "drag": s["drag"], "loss": s["loss"],
            "p_y": s["p_y"], "p_c": s["p_c"], "logit_gap": s["logit_gap"], "pr": s["pr"], "xi": s["xi"],
            "flip_step": self.flip_step, "jump_ratio": self.jump_ratio, "character": self.character,
            "failure_type": self.failure_type, "phi_stop_step": self.phi_stop_step,
            "ce_stop_step": self.ce_stop_step, "pre_resolved": self.pre_resolved,
            "embeddings_unchanged": self.embeddings_unchanged,
            "max_abs_delta_embedding": self.max_abs_delta_embedding, "max_abs_delta_head": self.max_abs_delta_head,
            "target_id": self.target_id, "competitor_id": self.competitor_id,
        }


def _max_abs_delta(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after.detach() - before).abs().max()) if before.numel() else 0.0


def finetune_trajectory(
    base: torch.nn.Module,
    input_ids: torch.Tensor,
    target_id: int,
    competitor_id: int | None,
    mode: str,
    lr: float,
    steps: int = DEFAULT_STEPS,
    nucleus: float = DEFAULT_NUCLEUS,
    targets: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[float], None] | None = None,
) -> tuple[dict[str, np.ndarray], int, torch.nn.Module, dict[str, float | None]]:
    """Fine-tune a copy of ``base`` for ``steps`` AdamW steps on ``-log p(target | input_ids)`` at the last position.

    ``input_ids`` [1, T]; ``mode`` "lora" (needs ``targets``) or "full". ``base`` is never modified. Returns the
    recorded series (``SERIES`` keys, length steps + 1), the competitor id (the given one or the one chosen at
    step 0), the trained model (a peft model under LoRA), and ``{"embedding": max|dE|, "head": max|dH| or None,
    "unchanged": 1.0 or 0.0}`` from bit-for-bit comparisons of the embedding (and untied head) before/after.
    """
    if mode not in ("lora", "full"):
        raise UsageError(f"$mode={mode}: unknown mode", "use lora or full", param="mode")
    if steps < 0 or not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"need steps >= 0 and a positive learning rate, got steps={steps}, lr={lr}")
    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random; seeding per run keeps runs order-independent
    model = copy.deepcopy(base).to(device)
    hf_model = model
    if mode == "lora":
        if not targets:
            raise UsageError("LoRA needs target modules")
        model = apply_lora(model, targets)
        hf_model = model.get_base_model()
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()  # dropout off: see the module docstring
    emb = hf_model.get_input_embeddings().weight
    U0, which = unembedding_matrix(hf_model)
    emb_before = emb.detach().clone()
    head_before = None if which.startswith("input_embeddings") else U0.detach().clone()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = input_ids.to(device)
    rec: dict[str, list[float]] = {k: [] for k in SERIES}
    comp = competitor_id
    for t in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        z = model(input_ids=ids).logits[0, -1]
        zd = z.detach().double().cpu()
        p = torch.softmax(zd, dim=-1)
        U, _ = unembedding_matrix(hf_model)  # the current rows: full fine-tuning moves them
        o = born_observables(p, zd, U, target_id, comp, nucleus, vocab_ranks=False)  # no rank recorded per step
        comp = o.competitor  # held fixed from step 0 on
        values = {"loss": -float(torch.log_softmax(zd, dim=-1)[target_id]), "p_y": o.p_y, "p_c": o.p_c,
                  "logit_gap": o.logit_gap, "phi": o.phi, "signal": o.signal, "drag": o.drag, "pr": o.pr, "xi": o.xi}
        for k, v in values.items():
            rec[k].append(v)
        if t == steps:
            break
        loss = torch.nn.functional.cross_entropy(z[None].to(torch.promote_types(z.dtype, torch.float32)), torch.tensor([target_id], device=z.device))
        loss.backward()
        opt.step()
        if progress is not None:
            progress(1)
    d_emb = _max_abs_delta(emb_before, emb)
    same = torch.equal(emb_before, emb.detach())
    d_head = None
    if head_before is not None:
        U_end, _ = unembedding_matrix(hf_model)
        d_head = _max_abs_delta(head_before, U_end)
        same = same and torch.equal(head_before, U_end.detach())
    series = {k: np.asarray(v, dtype=np.float64) for k, v in rec.items()}
    return series, int(comp), model, {"embedding": d_emb, "head": d_head, "unchanged": float(same)}


def summarise(context: Context, target_text: str, competitor_text: str, target_id: int, competitor_id: int,
              mode: str, lr: float, steps: int, series: dict[str, np.ndarray], deltas: dict) -> Trajectory:
    """Apply the summary rules to one run's series."""
    phi = series["phi"]
    flip = flip_step(phi)
    ratio = jump_ratio(phi)
    # A quiet stretch before a catapult is not saturation: Phi's plateau is searched from the flip on, and not
    # before the step at which Phi made its largest move (a context resolved before training flips at step 0,
    # and its slow start would otherwise pass for a plateau).
    phi_stop = saturation_stop_step(phi, start=max(flip or 0, largest_move_step(phi)))
    return Trajectory(
        context=context.context, target=target_text, competitor=competitor_text, target_id=target_id,
        competitor_id=competitor_id, mode=mode, lr=float(lr), steps=steps, series=series, flip_step=flip,
        jump_ratio=ratio, character=trajectory_character(ratio), failure_type=failure_type(phi, series["drag"]),
        phi_stop_step=phi_stop, ce_stop_step=saturation_stop_step(series["loss"]),
        embeddings_unchanged=bool(deltas["unchanged"]), max_abs_delta_embedding=deltas["embedding"],
        max_abs_delta_head=deltas["head"],
    )


# --------------------------------------------------------------------------------------------------------------
# The whole probe


@dataclass(frozen=True)
class FinetuneProbeResult(TreeResult):
    """finetune-probe over a contexts file, one trajectory per (context, learning rate)."""

    mode: str
    optimizer: str
    steps: int
    lrs: tuple[float, ...]
    nucleus: float
    seed: int
    unembedding: str
    target_modules: tuple[str, ...] | None
    target_note: str | None
    trajectories: tuple[Trajectory, ...]
    skipped: tuple[dict, ...] = ()  # the unusable contexts (born_gap.usable_contexts), by file line

    @property
    def swept(self) -> bool:
        """True when more than one learning rate was run (``--lr-sweep``)."""
        return len(self.lrs) > 1

    def critical(self) -> dict:
        """Empirical critical learning rate per context (smallest swept lr that flips Phi within the step
        budget; None when none does or when Phi was already positive before training) and their median."""
        per = []
        seen: dict[tuple[str, str], list[Trajectory]] = {}
        for tr in self.trajectories:
            seen.setdefault((tr.context, tr.target), []).append(tr)
        for (ctx, tgt), runs in seen.items():
            pre = any(r.pre_resolved for r in runs)
            crit = None if pre else critical_lr([r.lr for r in runs], [r.flip_step for r in runs])
            per.append({"context": ctx, "target": tgt, "critical_lr": crit, "pre_resolved": pre})
        finite = [p["critical_lr"] for p in per if p["critical_lr"] is not None]
        return {"lrs": list(self.lrs), "per_context": per, "median": float(np.median(finite)) if finite else None}

    HDF5_ONLY = frozenset({"lrs"})
    HDF5_LAYOUT = {"skipped_contexts": "_skipped_json"}  # JSON text in the report

    def to_tree(self) -> dict:
        """The ``--json`` payload and /finetune_probe: ``contexts`` (one Trajectory per run), the settings and,
        when sweeping, ``critical_lr``; the report adds ``lrs``."""
        doc = {"mode": self.mode, "optimizer": self.optimizer, "steps": self.steps, "nucleus": self.nucleus,
               "seed": self.seed, "unembedding": self.unembedding,
               "target_modules": list(self.target_modules) if self.target_modules else None,
               "target_note": self.target_note, "contexts": list(self.trajectories)}
        if self.swept:
            doc["critical_lr"] = self.critical()
        doc["skipped_contexts"] = list(self.skipped)
        doc["lrs"] = np.asarray(self.lrs, dtype=np.float64)
        return doc

    @staticmethod
    def _skipped_json(skipped: list[dict]) -> dict:
        return skipped_contexts_json(skipped)


def finetune_probe(
    model: torch.nn.Module,
    tokenizer,
    contexts: Sequence[Context],
    mode: str = "lora",
    lrs: Sequence[float] = (DEFAULT_LR["lora"],),
    steps: int = DEFAULT_STEPS,
    nucleus: float = DEFAULT_NUCLEUS,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[float], None] | None = None,
    strict: bool = False,
) -> FinetuneProbeResult:
    """Run ``finetune_trajectory`` for every context and learning rate, each from ``model``'s original weights.

    Targets and competitors are validated as single tokens before anything trains; unusable contexts are skipped
    and listed by file line (``strict``: a ``DataError`` naming the line; :func:`born_gap.usable_contexts`).
    ``progress(1)`` is called per optimizer step.
    """
    if mode not in ("lora", "full"):
        raise UsageError(f"$mode={mode}: unknown mode", "use lora or full", param="mode")
    if not lrs:
        raise UsageError("no learning rate given")
    prepared, skipped = usable_contexts(tokenizer, model, contexts, strict)
    targets, note = (lora_targets(model, target_modules) if mode == "lora" else (None, None))
    _, which = unembedding_matrix(model)
    runs = []
    for lr in lrs:
        for ctx, y, c, ids in prepared:
            stage = getattr(progress, "stage", None)
            if stage is not None:  # one bar per context (and learning rate), with its own ETA
                stage(f"finetune-probe {ctx.target.strip()!r} lr {float(lr):g}", steps)
            series, comp, _, deltas = finetune_trajectory(model, ids, y, c, mode, float(lr), steps, nucleus,
                                                          targets, seed, device, progress)
            comp_text = ctx.competitor if ctx.competitor is not None else tokenizer.decode([comp])
            runs.append(summarise(ctx, ctx.target, comp_text, y, comp, mode, float(lr), steps, series, deltas))
    return FinetuneProbeResult(mode=mode, optimizer=OPTIMIZER, steps=steps, lrs=tuple(float(x) for x in lrs),
                               nucleus=float(nucleus), seed=seed, unembedding=which,
                               target_modules=tuple(targets) if targets else None, target_note=note,
                               trajectories=tuple(runs), skipped=tuple(skipped))
