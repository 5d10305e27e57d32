"""`gxs`: Geometry x Slack (SPEC section 4, paper 000 sections 3-4).

- Transplant: copy the Q and K weights and biases of chosen heads of model B into model A (Piece.put on A's
  tensors, nothing else touched), evaluate each hybrid, and prove from the live model's parameters, bit by bit,
  that the swapped slices equal B's and every other element equals A's. Control: S (v, o, mlp_in, mlp_out,
  weights and biases) of B into A. Under grouped-query attention the K slice of a query head is its kv head,
  shared by the whole group: every query head of that group is reported as touched.
- Velocity: nu_g(t) = ||theta_g(t) - theta_g(t_prev)|| / (t - t_prev) of G (q, k) and S (v, o, mlp), from the
  backbone Gram (``run_backbone`` groups), and the consolidation step of each (first step after which nu stays
  below 10% of its peak): which group consolidates first.
- Slack: see :mod:`ckptaudit.analyses.gxs.evaluation`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.gxs.evaluation import (
    ALPHAS,
    SIGMAS,
    EvalStats,
    SlackResult,
    TaskEval,
    TokenEval,
    evaluate,
    load_token_data,
    run_slack,
)
from ckptaudit.errors import UsageError
from ckptaudit.io.types import RunLike

__all__ = ["ALPHAS", "SIGMAS", "Condition", "SlackResult", "TaskEval", "TokenEval", "TransplantResult",
           "VelocityResult", "check_compatible", "default_conditions", "evaluate", "head_label", "load_token_data",
           "parse_heads", "qk_pieces", "run_slack", "run_transplant", "run_velocity", "slack_pieces",
           "touched_query_heads", "transplant"]

Head = tuple[int, int]  # (block, query head)


def head_label(h: Head) -> str:
    """(block, head) -> "L.H"."""
    return f"{h[0]}.{h[1]}"


# ------------------------------------------------------------------------------------------------ heads


_DIGITS = re.compile(r"[0-9]{1,18}", re.ASCII)  # ASCII digits only: int() would also take "٣"


def parse_heads(spec: str, arch: Any) -> list[Head]:
    """'0.1,1.3' (block.query_head) or '1.*' (every head of block 1) -> sorted unique (block, head) pairs."""
    if arch.n_heads is None:
        raise UsageError("--heads needs the number of attention heads, unknown for this checkpoint",
                         "keep config.json beside the weights")
    out: set[Head] = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        layer, _, head = item.partition(".")
        if not (_DIGITS.fullmatch(layer) and (head == "*" or _DIGITS.fullmatch(head))):
            raise UsageError(f"--heads {spec}: {item!r} is not LAYER.HEAD", "e.g. --heads 0.1,1.3 or --heads 1.*")
        block = int(layer)
        heads = range(arch.n_heads) if head == "*" else [int(head)]
        if not 0 <= block < arch.n_layers:
            raise UsageError(f"--heads {item}: block {block} out of range (the model has {arch.n_layers} blocks)", None)
        for h in heads:
            if not 0 <= h < arch.n_heads:
                raise UsageError(f"--heads {item}: head {h} out of range (blocks have {arch.n_heads} query heads)", None)
            out.add((block, h))
    if not out:
        raise UsageError(f"--heads {spec!r}: no head given", "e.g. --heads 0.1,1.3")
    return sorted(out)


def all_heads(arch: Any) -> list[Head]:
    """Every (block, query head) of the model."""
    if arch.n_heads is None:
        raise UsageError("the number of attention heads is unknown for this checkpoint", "keep config.json beside the weights")
    blocks = sorted({p.block for p in arch.select(("q",)) if p.block is not None})
    return [(b, h) for b in blocks for h in range(arch.n_heads)]


def qk_pieces(arch: Any, heads: Iterable[Head]) -> list[Any]:
    """Q pieces of each query head and K pieces of its kv head (weights, then biases), without duplicates."""
    out: dict[Any, None] = {}
    for block, h in heads:
        for p in arch.head_pieces(block, "q", h):
            out.setdefault(p)
        for p in arch.head_pieces(block, "k", arch.kv_head(h)):
            out.setdefault(p)
    return list(out)


def touched_query_heads(arch: Any, heads: Iterable[Head]) -> list[Head]:
    """Query heads whose routing a Q/K transplant of ``heads`` changes: the heads themselves and, because K is
    shared under grouped-query attention, every query head reading the same kv head."""
    out: set[Head] = set()
    for block, h in heads:
        kv = arch.kv_head(h)
        out.update((block, q) for q in range(arch.n_heads) if arch.kv_head(q) == kv)
    return sorted(out)


def slack_pieces(arch: Any) -> list[Any]:
    """S of every block: v, o, mlp_in, mlp_out, weights and biases (the reverse control)."""
    return [p for p in arch.select(("v", "o", "mlp_in", "mlp_out"), include_bias=True) if p.block is not None]


# --------------------------------------------------------------------------------------- tensor level


def check_compatible(shapes_a: Mapping[str, tuple], shapes_b: Mapping[str, tuple], arch_a: Any, arch_b: Any,
                     label_a: str = "A", label_b: str = "B") -> None:
    """Raise UsageError (exit 2) unless A and B have the same architecture, tensor names, shapes and heads."""
    problems = []
    if arch_a.name != arch_b.name:
        problems.append(f"architecture {arch_a.name} vs {arch_b.name}")
    for attr in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        va, vb = getattr(arch_a, attr), getattr(arch_b, attr)
        if va != vb:
            problems.append(f"{attr} {va} vs {vb}")
    only_a = sorted(set(shapes_a) - set(shapes_b))
    only_b = sorted(set(shapes_b) - set(shapes_a))
    if only_a:
        problems.append(f"tensors only in {label_a}: {', '.join(only_a[:3])}{' ...' if len(only_a) > 3 else ''}")
    if only_b:
        problems.append(f"tensors only in {label_b}: {', '.join(only_b[:3])}{' ...' if len(only_b) > 3 else ''}")
    differ = [n for n in shapes_a if n in shapes_b and tuple(shapes_a[n]) != tuple(shapes_b[n])]
    if differ:
        n = differ[0]
        problems.append(f"{len(differ)} tensor shape(s) differ, e.g. {n} {tuple(shapes_a[n])} vs {tuple(shapes_b[n])}")
    if problems:
        raise UsageError(f"{label_a} and {label_b} are not the same architecture and shape: " + "; ".join(problems[:4]),
                         "a transplant needs two checkpoints of one model configuration (e.g. two seeds of a run)")


def transplant(target: Mapping[str, torch.Tensor], donor: Mapping[str, torch.Tensor],
               pieces: Sequence[Any]) -> dict[str, torch.Tensor]:
    """A new state dict: ``target`` with every piece copied from ``donor`` (Piece.put on a copy of the touched
    tensors; untouched tensors are shared with ``target``, not copied)."""
    out = dict(target)
    for name in {p.tensor for p in pieces}:
        out[name] = target[name].detach().clone()
    for p in pieces:
        p.put(out[p.tensor], p.take(donor[p.tensor]).to(out[p.tensor].dtype))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of the same bytes: equality is bitwise (NaN == NaN with the same payload, -0 != +0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.dtype.is_floating_point:
        return t.contiguous().view(ints[t.element_size()])
    return t


def _masks(pieces: Sequence[Any], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for p in pieces:
        m = masks.setdefault(p.tensor, torch.zeros(like[p.tensor].shape, dtype=torch.bool,
                                                   device=like[p.tensor].device))
        p.take(m).fill_(True)
    return masks


# ---------------------------------------------------------------------------------------- transplant


@dataclass(frozen=True)
class Condition:
    """One hybrid: ``pieces`` of B written into A. kind: baseline | qk | control."""

    name: str
    kind: str
    heads: tuple[Head, ...]
    pieces: tuple[Any, ...]
    touched: tuple[Head, ...] = ()


def default_conditions(arch: Any, heads: Sequence[Head] | None = None, control: bool = True) -> list[Condition]:
    """Baseline, then the sweep (1 head, 2 heads, all heads of all layers) or the chosen ``heads``, then the
    reverse control (S of B into A)."""
    conds = [Condition("A (baseline)", "baseline", (), ())]
    if heads is None:
        every = all_heads(arch)
        sweep = [("swap 1 head", every[:1]), ("swap 2 heads", every[:2]), ("swap all heads", every)]
        seen: set[tuple[Head, ...]] = set()
        for name, hs in sweep:  # a 1-head model has no distinct "2 heads" condition
            if tuple(hs) in seen:
                continue
            seen.add(tuple(hs))
            conds.append(Condition(name, "qk", tuple(hs), tuple(qk_pieces(arch, hs)),
                                   tuple(touched_query_heads(arch, hs))))
    else:
        label = "swap heads " + ",".join(head_label(h) for h in heads)
        conds.append(Condition(label, "qk", tuple(heads), tuple(qk_pieces(arch, heads)),
                               tuple(touched_query_heads(arch, heads))))
    if control:
        conds.append(Condition("control: S of B", "control", (), tuple(slack_pieces(arch))))
    return conds


@dataclass(frozen=True, eq=False)
class TransplantResult:
    """Per condition: name, kind, heads, touched_query_heads, params_swapped (scalars in the swapped slices),
    params_changed (of those, how many differ from A), accuracy, loss, margin, swapped_equal_B, rest_equal_A."""

    conditions: tuple[dict[str, Any], ...]
    baseline_accuracy: float
    baseline_loss: float
    donor_accuracy: float
    donor_loss: float
    exact_copy: bool
    architecture: str
    n_heads: int | None
    n_kv_heads: int | None
    n_layers: int
    evaluator: str
    n: int
    a: str = ""
    b: str = ""
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """--json keys: conditions, baseline_accuracy, baseline_loss, donor_accuracy, donor_loss, exact_copy,
        a, b, architecture, n_layers, n_heads, n_kv_heads, eval, n, notes."""
        return {"a": self.a, "b": self.b, "conditions": [dict(c) for c in self.conditions],
                "baseline_accuracy": self.baseline_accuracy, "baseline_loss": self.baseline_loss,
                "donor_accuracy": self.donor_accuracy, "donor_loss": self.donor_loss, "exact_copy": self.exact_copy,
                "architecture": self.architecture, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "eval": self.evaluator, "n": self.n, "notes": list(self.notes)}

    def to_hdf5_tree(self) -> dict[str, Any]:
        """Tree under /gxs/transplant: conditions/<i> (attributes + heads string datasets), scalars as attributes."""
        tree = self.to_json()
        tree["conditions"] = [{k: (v if v != [] else None) for k, v in c.items()} for c in tree["conditions"]]
        tree["notes"] = list(self.notes) or None
        return tree


def run_transplant(model_a: torch.nn.Module, source_a: Any, source_b: Any, arch: Any, evaluator: Any,
                   conditions: Sequence[Condition], donor_stats: EvalStats,
                   progress: Callable[[int], None] | None = None, a: str = "", b: str = "") -> TransplantResult:
    """Evaluate every condition on ``model_a`` (loaded from A) and prove each hybrid bit by bit.

    source_a / source_b: anything with ``keys()`` and ``get(name)`` giving the stored tensors (a TensorSource or
    a state dict). For each condition B's slices are written into the live parameters, the model is evaluated,
    every stored tensor of A is compared with the live parameter (swapped elements against B, all others against
    A, bitwise after casting to the model's dtype), and A's values are restored. ``donor_stats``: B evaluated on
    its own. The model is A again on return.
    """
    live = model_a.state_dict(keep_vars=True)
    names = list(source_a.keys())
    missing = [n for n in names if n not in live]
    if missing:
        raise UsageError(f"stored tensors with no parameter in the model: {', '.join(missing[:3])}", None)
    touched = sorted({p.tensor for c in conditions for p in c.pieces})
    original = {n: live[n].detach().clone() for n in touched}
    donor = {n: source_b.get(n).to(device=live[n].device, dtype=live[n].dtype) for n in touched}
    rows: list[dict[str, Any]] = []
    base: EvalStats | None = None
    exact = True
    for cond in conditions:
        with torch.no_grad():
            for p in cond.pieces:
                p.put(live[p.tensor].data, p.take(donor[p.tensor]))
        stats = evaluate(model_a, evaluator)
        base = stats if cond.kind == "baseline" else base
        swapped_ok, rest_ok, changed = _prove(live, names, source_a, donor, cond.pieces)
        with torch.no_grad():
            for n in {p.tensor for p in cond.pieces}:
                live[n].data.copy_(original[n])
        exact = exact and swapped_ok and rest_ok
        rows.append({
            "name": cond.name, "kind": cond.kind, "heads": [head_label(h) for h in cond.heads],
            "touched_query_heads": [head_label(h) for h in cond.touched],
            "params_swapped": int(sum(p.numel for p in cond.pieces)), "params_changed": int(changed),
            "accuracy": stats.accuracy, "loss": stats.loss, "margin": stats.margin,
            "swapped_equal_B": swapped_ok, "rest_equal_A": rest_ok,
        })  # fmt: skip
        if progress is not None:
            progress(1)
    assert base is not None, "the baseline condition is always evaluated first"
    for row in rows:
        row["delta_accuracy"] = row["accuracy"] - base.accuracy
    notes = []
    if arch.kv_group and arch.kv_group > 1:
        notes.append(f"grouped-query attention: {arch.n_heads} query heads share {arch.n_kv_heads} kv heads; "
                     f"swapping the K of a query head changes the routing of all {arch.kv_group} heads of its group "
                     "(touched_query_heads)")
    return TransplantResult(tuple(rows), base.accuracy, base.loss, donor_stats.accuracy, donor_stats.loss, exact,
                            arch.name, arch.n_heads, arch.n_kv_heads, arch.n_layers, evaluator.name, base.n, a, b,
                            tuple(notes))


def _prove(live: Mapping[str, torch.Tensor], names: Sequence[str], source_a: Any,
           donor: Mapping[str, torch.Tensor], pieces: Sequence[Any]) -> tuple[bool, bool, int]:
    """(swapped slices == B bitwise, every other element == A bitwise, swapped elements that differ from A)."""
    masks = _masks(pieces, live)
    swapped_ok, rest_ok, changed = True, True, 0
    with torch.no_grad():
        for n in names:
            cur = live[n].detach()
            ref = source_a.get(n).to(device=cur.device, dtype=cur.dtype)
            m = masks.get(n)
            if m is None:
                rest_ok = rest_ok and torch.equal(_bits(cur), _bits(ref))
                continue
            cb, rb, db = _bits(cur), _bits(ref), _bits(donor[n])
            swapped_ok = swapped_ok and torch.equal(cb[m], db[m])
            rest_ok = rest_ok and torch.equal(cb[~m], rb[~m])
            changed += int((cb[m] != rb[m]).sum().item())
    return bool(swapped_ok), bool(rest_ok), changed


# ------------------------------------------------------------------------------------------ velocity


@dataclass(frozen=True, eq=False)
class VelocityResult:
    """Velocity of G and S per drift row (parameter units per step; the first row is relative to the anchor)."""

    steps: tuple[int, ...]
    anchor_step: int
    velocity_G: np.ndarray
    velocity_S: np.ndarray
    consolidation_step_G: int | None
    consolidation_step_S: int | None
    order: str
    dims: dict[str, int]
    include_bias: bool

    def to_json(self) -> dict[str, Any]:
        """--json keys: steps, anchor_step, velocity_G, velocity_S, consolidation_step_G, consolidation_step_S,
        order, peak_step_G, peak_step_S, dim_G, dim_S, include_bias."""
        return {"steps": list(self.steps), "anchor_step": self.anchor_step, "velocity_G": self.velocity_G.tolist(),
                "velocity_S": self.velocity_S.tolist(), "consolidation_step_G": self.consolidation_step_G,
                "consolidation_step_S": self.consolidation_step_S, "order": self.order,
                "peak_step_G": _peak(self.steps, self.velocity_G), "peak_step_S": _peak(self.steps, self.velocity_S),
                "dim_G": self.dims.get("G"), "dim_S": self.dims.get("S"), "include_bias": self.include_bias}

    def to_hdf5_tree(self) -> dict[str, Any]:
        """Tree under /gxs/velocity: datasets steps, velocity_G, velocity_S; the rest as attributes."""
        tree = self.to_json()
        tree["steps"] = np.asarray(self.steps, dtype=np.int64)
        tree["velocity_G"], tree["velocity_S"] = self.velocity_G, self.velocity_S
        return tree


def _peak(steps: Sequence[int], nu: np.ndarray) -> int | None:
    finite = np.where(np.isfinite(nu), nu, -np.inf)
    return int(steps[int(np.argmax(finite))]) if len(steps) and np.isfinite(finite).any() else None


def consolidation_order(step_g: int | None, step_s: int | None) -> str:
    """"G first" | "S first" | "together" | "G only" | "S only" | "neither" (None = not consolidated by the end)."""
    if step_g is None and step_s is None:
        return "neither"
    if step_s is None:
        return "G only"
    if step_g is None:
        return "S only"
    return "G first" if step_g < step_s else "S first" if step_s < step_g else "together"


def run_velocity(run: RunLike, include_bias: bool = False, device: str = "cpu", role_map: Any = None,
                 anchor_step: int | None = None, progress: Callable[[int], None] | None = None,
                 allow_partial_trunk: bool = False) -> VelocityResult:
    """Velocities and consolidation steps of G and S over ``run``, from ``run_backbone``'s role-group Grams."""
    from ckptaudit.analyses.backbone.run import run_backbone

    report = run_backbone(run, anchor_step=anchor_step, blocks=[], include_bias=include_bias, device=device,
                          role_map=role_map, progress=progress, allow_partial_trunk=allow_partial_trunk)
    g, s = report.groups["G"], report.groups["S"]
    return VelocityResult(tuple(report.steps), report.anchor_step, np.asarray(g.velocity, dtype=np.float64),
                          np.asarray(s.velocity, dtype=np.float64), g.consolidation_step, s.consolidation_step,
                          consolidation_order(g.consolidation_step, s.consolidation_step),
                          {"G": int(report.dims["group_G"]), "S": int(report.dims["group_S"])}, include_bias)
