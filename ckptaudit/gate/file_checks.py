"""Checks of the files themselves: provenance (Level-2 training state), safe serialization, finite values."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptaudit.errors import CorruptFileError, OptimizerStateError, UnsafePickleError
from ckptaudit.gate.context import CHECK_FAILURES, GateContext, _label, _rel, _weight_file
from ckptaudit.gate.registry import Key, gate_check
from ckptaudit.gate.result import FAIL, PASS, CheckResult
from ckptaudit.io.safety import DEFAULT_EXEMPT_FILES
from ckptaudit.io.steps import format_steps
from ckptaudit.io.types import StoredCheckpoint

ARTIFACTS = ("optimizer", "scheduler", "trainer_state", "lr_history", "rng_state")

# -------------------------------------------------------------------------------------------- provenance


@gate_check(
    "provenance",
    "Level-2 training state (optimizer moments, scheduler, trainer state, RNG state) is present and the optimizer "
    "state fits the weights (same parameter names and shapes).",
    {
        "require": Key("list[str]", ["optimizer", "scheduler", "trainer_state", "rng_state"],
                       "Level-2 artifacts each gated checkpoint must carry (as `ckptaudit inspect` finds them).",
                       choices=ARTIFACTS),
        "check_shapes": Key("bool", True,
                            "The optimizer state must map to parameter names exactly (`io.optimizer.load_optimizer_state`, "
                            "which refuses rather than guesses) and every named parameter must exist in the weights with "
                            "the shape of its moments. The failure names the parameter."),
    },
    doc="Paper 000 section 6: weights without their training state are not a complete artifact.",
    value="the number of problems; the message names the first (`step 60: missing optimizer`, "
    "`transformer.wpe.weight: optimizer exp_avg shape (N, d) != weight shape (N-1, d)`).",
)  # fmt: skip
def check_provenance(ctx: GateContext, settings: dict) -> CheckResult:
    """Required Level-2 artifacts present in every gated checkpoint, and the optimizer state fits the weights."""
    require = list(settings["require"])
    threshold = {"require": require, "check_shapes": settings["check_shapes"]}
    problems: list[tuple[str, str]] = []  # (message, file)
    for ckpt in ctx.targets:
        info = ctx.info(ckpt)  # a file that cannot be parsed is bad input: raised, exit 2
        _refuse_unreadable_artifacts(ckpt, info)
        missing = [a for a in require if not info.artifacts.get(a, False)]
        if missing:
            problems.append((f"{_label(ckpt)}: missing {', '.join(missing)}", _weight_file(ckpt)))
        if settings["check_shapes"] and info.artifacts.get("optimizer"):
            problem = _optimizer_fits_weights(ctx, ckpt)
            if problem is not None:
                problems.append((f"{_label(ckpt)}: {problem[0]}", problem[1]))
    n = len(ctx.targets)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return CheckResult("provenance", FAIL, f"{len(problems)} problem(s) in {n} checkpoint(s)", threshold,
                           problems[0][0] + more, problems[0][1], {"problems": [p for p, _ in problems]})  # fmt: skip
    what = ", ".join(require) if require else "no artifacts required"
    shapes = "; optimizer state fits the weights" if settings["check_shapes"] else ""
    return CheckResult("provenance", PASS, f"complete in {n} checkpoint(s)", threshold, f"{what} present{shapes}",
                       _weight_file(ctx.targets[-1]))  # fmt: skip


def _refuse_unreadable_artifacts(ckpt: StoredCheckpoint, info: Any) -> None:
    """A Level-2 file that is there but cannot be read (0 bytes, truncated, not the pickle its name says) is bad
    input, not a missing artifact: CorruptFileError naming it."""
    wanted = [ckpt.optimizer_file, ckpt.scheduler_file, *ckpt.rng_files]
    by_path = {Path(f.path): f for f in info.files}
    for f in wanted:
        if f is None or Path(f).is_dir():
            continue
        verdict = by_path.get(Path(f))
        if verdict is not None and not verdict.loadable:
            raise CorruptFileError(f"{f}: unreadable ({verdict.detail})",
                                   "restore the file from the training run, or remove it and gate without it")


def _optimizer_fits_weights(ctx: GateContext, ckpt: StoredCheckpoint) -> tuple[str, str] | None:
    """(problem, file) when the optimizer state cannot be named exactly or does not match the weights' shapes.

    load_optimizer_state refuses (naming the parameter) when its index -> name mapping does not fit the model the
    config describes; the weights themselves are then compared name by name, so weights that disagree with both
    the config and the optimizer are caught too.
    """
    opt_file = str(ckpt.optimizer_file or ckpt.path)
    try:
        opt = ctx.optimizer(ckpt)
    except CHECK_FAILURES as e:
        return f"optimizer state does not fit: {e.message}", opt_file
    try:
        with ckpt.tensors() as src:
            names = set(src.keys())
            for name, ps in opt.state.items():
                if name not in names:
                    return f"optimizer state names parameter {name!r}, which the weights do not contain", opt_file
                shape = tuple(src.shape(name))
                for key in ("exp_avg", "exp_avg_sq"):
                    t = getattr(ps, key)
                    if t is not None and tuple(t.shape) != shape:
                        return (f"{name}: optimizer {key} shape {tuple(t.shape)} != weight shape {shape}", opt_file)
    except UnsafePickleError as e:
        return f"weights cannot be loaded weights-only: {e.message}", _weight_file(ckpt)
    return None


# ------------------------------------------------------------------------------------------ safe formats


def _exempt(path: str, ckpt_path: Path, patterns: Sequence[str]) -> bool:
    p = Path(path)
    rel = _rel(p, ckpt_path)
    return any(fnmatch.fnmatch(p.name, pat) or fnmatch.fnmatch(rel, pat) for pat in patterns)


@gate_check(
    "safe_serialization",
    "Every file is safetensors/GGUF/text or a pickle that loads weights-only; a pickle that needs arbitrary "
    "globals is refused without being run.",
    {
        "allow_files": Key("list[str]", [],
                           "Files exempt from the check, matched against the file name and the path inside the "
                           "checkpoint. The `--init` template exempts `training_args.bin`, the pickled "
                           "`TrainingArguments` the Trainer always writes: it needs transformers' classes (verdict "
                           "`needs-allow-listed-globals`), which ckptaudit reads only as plain data through "
                           "`io/plainpickle.py`'s stand-ins; remove it to insist on none.",
                           type_text="array of glob patterns"),
    },
    doc="Every file of each gated checkpoint must be *safe* by the rule of [docs/security.md](security.md) "
    "(`ckptaudit.io.safety.file_safety`): a data format (safetensors, GGUF, text, JSON, protobuf, DCP tensor data) or a "
    "pickle that loads weights-only, with at most numpy's array globals allow-listed. Formats are recognised by "
    "content, not by extension; pickles of every protocol are read by a static opcode scanner and never executed. A "
    "pickle that needs other globals (`builtins.open`, `os.system`, transformers' `TrainingArguments`) fails the "
    "check, naming them. A file that cannot be read at all (0 bytes, truncated, binary content of no known kind) is "
    "bad input: exit 2, unless `allow_files` exempts it.",
    value="the number of unsafe files; the file of the first is the SARIF location.",
    init={"allow_files": list(DEFAULT_EXEMPT_FILES)},  # io.safety: the one list inspect speaks of too
)  # fmt: skip
def check_safe_serialization(ctx: GateContext, settings: dict) -> CheckResult:
    """Every file of the gated checkpoints safe per io.safety.file_safety (content-based, nothing executed)."""
    allow = list(settings["allow_files"])
    threshold = {"unsafe_files": 0, "allow_files": allow}
    unsafe: list[Any] = []
    exempted: list[str] = []
    n_files = 0
    for ckpt in ctx.targets:
        info = ctx.info(ckpt)
        for f in info.files:
            n_files += 1
            if f.safe:
                continue
            if _exempt(f.path, ckpt.path, allow):
                exempted.append(Path(f.path).name)
            elif not f.loadable:  # cannot be judged: bad input, not a failed check
                raise CorruptFileError(f"{f.path}: unreadable ({f.detail})",
                                       "restore or remove the file, or exempt it with allow_files in the policy")
            else:
                unsafe.append(f)
    note = f" ({len(exempted)} exempted by allow_files: {', '.join(sorted(set(exempted)))})" if exempted else ""
    if unsafe:
        first = unsafe[0]
        more = f" (+{len(unsafe) - 1} more unsafe file(s))" if len(unsafe) > 1 else ""
        return CheckResult("safe_serialization", FAIL, len(unsafe), threshold,
                           f"{first.path}: {first.detail or 'not safe to load'}{more}{note}", first.path,
                           {"unsafe": [f.path for f in unsafe]})  # fmt: skip
    return CheckResult("safe_serialization", PASS, 0, threshold, f"{n_files} file(s) safe to load{note}",
                       _weight_file(ctx.targets[-1]))  # fmt: skip


# --------------------------------------------------------------------------------------------- finite


def _nonfinite(t: Any) -> tuple[int, int]:
    """(number of NaN, number of Inf) in tensor ``t``; 0, 0 for integer tensors."""
    import torch

    if not (t.is_floating_point() or t.is_complex()):
        return 0, 0
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return 0, 0
    n_nan = int(torch.isnan(t).sum())
    return n_nan, int((~finite).sum()) - n_nan


def _scan_weights(ckpt: StoredCheckpoint) -> tuple[list[tuple[str, str, int, int]], int]:
    """Non-finite weight tensors of ``ckpt`` as (tensor, file, n_nan, n_inf), and the number of tensors read."""
    bad = []
    with ckpt.tensors() as src:
        names = list(src.keys())
        files = [str(f) for f in src.files()]
        for name in names:  # one tensor at a time: memory stays flat in model size
            n_nan, n_inf = _nonfinite(src.get(name))
            if n_nan or n_inf:
                where = files[0] if len(files) == 1 else _file_of(src, name, files)
                bad.append((name, where, n_nan, n_inf))
    return bad, len(names)


def _file_of(src: Any, name: str, files: list[str]) -> str:
    shard = getattr(src, "_shard", None)
    if callable(shard):
        try:
            return str(shard(name).files()[0])
        except Exception:  # noqa: BLE001 - the index is enough to name the checkpoint
            pass
    return files[0] if files else str(src.path)


def _scan_moments(ctx: GateContext, ckpt: StoredCheckpoint) -> tuple[list[tuple[str, str, int, int]], int]:
    """Non-finite optimizer moments of ``ckpt`` named by parameter (by index when names cannot be mapped)."""
    import torch

    path = str(ckpt.optimizer_file or ckpt.path)
    try:
        entries = [
            (f"{name}.{key}", getattr(ps, key))
            for name, ps in ctx.optimizer(ckpt).state.items()
            for key in ("exp_avg", "exp_avg_sq")
        ]
    except OptimizerStateError:
        # Names unknown (provenance reports why): still scan, naming moments by their index in the file.
        from ckptaudit.io.tensors import safe_torch_load

        raw = safe_torch_load(path)
        state = raw.get("state", {}) if isinstance(raw, dict) else {}
        entries = [(f"state[{i}].{k}", v) for i, e in state.items() if isinstance(e, dict) for k, v in e.items()]
    bad, n = [], 0
    for label, t in entries:
        if isinstance(t, torch.Tensor):
            n += 1
            n_nan, n_inf = _nonfinite(t)
            if n_nan or n_inf:
                bad.append((label, path, n_nan, n_inf))
    return bad, n


@gate_check(
    "finite",
    "No NaN or Inf in any weight tensor or optimizer moment.",
    {
        "weights": Key("bool", True, "Scan every floating-point weight tensor."),
        "moments": Key("bool", True, "Scan the optimizer moments (`exp_avg`, `exp_avg_sq`), named by parameter "
                       "(`transformer.wte.weight.exp_avg_sq`), or by index when the state cannot be mapped to names."),
    },
    doc="Tensor by tensor, so memory stays flat in model size.",
    value="the number of non-finite tensors; the message names the first and counts its NaN and Inf values.",
)  # fmt: skip
def check_finite(ctx: GateContext, settings: dict) -> CheckResult:
    """No NaN/Inf in weights and optimizer moments of the gated checkpoints; names the first offending tensor."""
    threshold = {"nonfinite_tensors": 0, "weights": settings["weights"], "moments": settings["moments"]}
    bad: list[tuple[str, str, int, int, Any]] = []
    n_tensors = n_moments = 0
    no_moments: list[int] = []
    for ckpt in ctx.targets:
        try:
            if settings["weights"]:
                found, k = _scan_weights(ckpt)
                n_tensors += k
                bad += [(*b, ckpt) for b in found]
            if settings["moments"]:
                if ckpt.optimizer_file is None and ckpt.layout != "lightning":
                    no_moments.append(ckpt.step)
                else:
                    found, k = _scan_moments(ctx, ckpt)
                    n_moments += k
                    bad += [(*b, ckpt) for b in found]
        except UnsafePickleError as e:  # well-formed but not loadable weights-only: the check fails
            return CheckResult("finite", FAIL, None, threshold, f"{_label(ckpt)}: cannot be read: {e.message}", str(ckpt.path))
    if bad:
        name, where, n_nan, n_inf, ckpt = bad[0]
        more = f" (+{len(bad) - 1} more non-finite tensor(s))" if len(bad) > 1 else ""
        return CheckResult("finite", FAIL, len(bad), threshold,
                           f"{name} ({_label(ckpt)}, {Path(where).name}) has {n_nan} NaN and {n_inf} Inf values{more}",
                           where, {"tensors": [b[0] for b in bad]})  # fmt: skip
    msg = f"{n_tensors} weight tensor(s) and {n_moments} moment tensor(s) finite"
    if no_moments:
        msg += f"; no optimizer state to scan at step(s) {format_steps(no_moments)}"
    return CheckResult("finite", PASS, 0, threshold, msg, _weight_file(ctx.targets[-1]))
