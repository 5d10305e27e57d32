"""The Python API: every analysis as a function of Python values, returning the result whose ``to_json()`` is the
command's ``--json`` output for the same options.

Each function takes what its command takes, with the same defaults: paths (``str`` or ``Path``), checkpoint
selections as the command's step specs (``"100:1000"``, ``"::2"``) or as Python ints (``60``, ``[40, 50, 60]``),
numbers, and the analysis' settings dataclass where it has one. The command-line commands call these functions,
so the options and the glue between them and the analyses live here once.

Errors are the :class:`ckptaudit.errors.CkptAuditError` subclasses the command prints as one line; the API raises
them, never prints and never exits. ``progress`` is an optional callable ``progress(n)`` told of every ``n`` units
of work done (steps, pairs, checkpoints, tensor reads); an object with ``set_total(total)`` and
``stage(description, total)`` methods (a progress bar) is told the totals as well.

Example::

    import ckptaudit
    bb = ckptaudit.backbone("runs/seed42", steps="0:900")
    print(bb.to_json()["trunk"]["rho"][0])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "Report",
    "EmbeddingsReport",
    "inspect",
    "backbone",
    "fisher",
    "resume_probe",
    "classify_embeddings",
    "born_gap",
    "regimes",
    "extrapolate",
    "cross_seed",
    "run_gate",
]

Steps = str | int | Iterable[int] | None
Note = Callable[[str], None] | None


class Report:
    """An analysis result with what its command adds to the JSON and the HDF5 report (the left-out files of
    ``inspect``; precision, data selection, threads and wall time of the trajectory analyses).

    ``result`` is the analysis' own result object; its attributes read through (``report.checkpoints``).
    ``inputs`` are the checkpoints the HDF5 report lists.
    """

    def __init__(self, result: Any, json_extra: dict | None = None, tree_extra: dict | None = None,
                 inputs: Sequence[Any] = ()):
        self.result = result
        self.json_extra = dict(json_extra or {})
        self.tree_extra = dict(tree_extra or {})
        self.inputs = list(inputs)

    def to_json(self) -> dict:
        """The command's ``--json`` output: the result's JSON with the extra keys, in plain JSON types (NaN and
        infinities as None, as the command prints them)."""
        from ckptaudit.report.console import to_jsonable

        return to_jsonable({**self.result.to_json(), **self.json_extra})

    def to_hdf5_tree(self) -> dict:
        """The tree the command writes to its HDF5 report."""
        return {**self.result.to_hdf5_tree(), **self.tree_extra}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "result":
            raise AttributeError(name)
        return getattr(self.result, name)

    def __repr__(self) -> str:
        return f"Report({type(self.result).__name__})"


class EmbeddingsReport:
    """classify-embeddings of one model: ``embed`` (the input embeddings) and ``head`` (the LM head when untied,
    else None), each an OverlapResult. ``to_json()`` is the command's JSON: the embedding's, with ``head`` inside."""

    def __init__(self, results: dict, path: Path):
        self.results = results
        self.embed = results["embed"]
        self.head = results.get("head")
        self.path = path

    def to_json(self) -> dict:
        from ckptaudit.report.console import to_jsonable

        summary = self.embed.to_json()
        if self.head is not None:
            summary["head"] = self.head.to_json()
        return to_jsonable(summary)

    def to_hdf5_tree(self) -> dict:
        return {role: r.to_hdf5_tree() for role, r in self.results.items()}

    @property
    def inputs(self) -> list:
        """The model's weight files, as the HDF5 report lists them."""
        from ckptaudit.cli.classify_embeddings_cmd import _ModelInput

        return [_ModelInput(self.path)]


# ------------------------------------------------------------------------------------------- shared glue


class _Hook:
    """A user's progress callable seen as a progress bar: ``set_total`` and ``stage`` only when it has them."""

    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def __call__(self, n: float = 1) -> None:
        self._fn(n)

    def set_total(self, total: float) -> None:
        if hasattr(self._fn, "set_total"):
            self._fn.set_total(total)

    def stage(self, description: str, total: float | None) -> None:
        if hasattr(self._fn, "stage"):
            self._fn.stage(description, total)


def _hook(progress: Any) -> _Hook | None:
    return None if progress is None else _Hook(progress)


class _NoteSink:
    def __init__(self, note: Note):
        self._note = note

    def note(self, text: str) -> None:
        if self._note is not None:
            self._note(text)


@contextmanager
def _notes(note: Note):
    """While an API call runs, the notes of run discovery ("left out: ...") go to ``note`` (the command's output
    sink) or nowhere: the API never prints."""
    from ckptaudit.cli import common

    saved = list(common._CURRENT_OUTPUT)
    common._CURRENT_OUTPUT[:] = [_NoteSink(note)]
    try:
        yield
    finally:
        common._CURRENT_OUTPUT[:] = saved


def _steps(steps: Steps) -> str | None:
    """A step selection as the --steps spec: a spec string as it is, an int or ints as a list of steps."""
    if steps is None or isinstance(steps, str):
        return steps
    if isinstance(steps, int) and not isinstance(steps, bool):
        return str(steps)
    return ",".join(str(int(s)) for s in steps)


def _path(p: Any) -> Path | None:
    return None if p is None else Path(p)


def _device(device: str) -> str:
    from ckptaudit.cli.options import resolve_device

    return resolve_device(device)


def _floats(values: str | float | Iterable[float], option: str, example: str) -> tuple[float, ...]:
    from ckptaudit.cli.options import parse_floats

    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = str(values)
    if not isinstance(values, str):
        values = ",".join(str(float(v)) for v in values)
    return parse_floats(values, option, example)


def _pair(spec: str | tuple[int, int], parse: Callable[[str], Any]) -> Any:
    return parse(spec if isinstance(spec, str) else ":".join(str(int(x)) for x in spec))


def _thresholds(thresholds: str | tuple[float, float] | None) -> tuple[float, float] | None:
    from ckptaudit.analyses.regimes.run import parse_thresholds

    if thresholds is not None and not isinstance(thresholds, str):
        thresholds = ",".join(str(float(x)) for x in thresholds)
    return parse_thresholds(thresholds)


def _role_map(role_map: Any) -> Any:
    from ckptaudit.io.roles import load_role_map

    return load_role_map(Path(role_map)) if role_map is not None else None


# ------------------------------------------------------------------------------------------- inspect, backbone


def inspect(path: str | Path, *, steps: Steps = None, revisions: str | None = None, role_map: str | Path | None = None,
            file_check: bool = True, progress: Any = None, _note: Note = None) -> Report:
    """``ckptaudit inspect PATH``: checkpoints, parameters per role, Level-2 artifacts, file safety.

    Returns a :class:`Report` of the InspectResult; its JSON adds ``left_out`` (files found but not in the run).
    """
    from ckptaudit.analyses.inspect import inspect_run
    from ckptaudit.cli.common import load_run

    with _notes(_note):
        run = load_run(Path(path), _steps(steps), revisions)
        rmap = _role_map(role_map)
        hook = _hook(progress)
        if hook is not None:
            hook.set_total(len(run.checkpoints))
        result = inspect_run(run, role_map=rmap, check_files=file_check, progress=hook)
    return Report(result, {"left_out": [{"path": p, "why": why} for p, why in run.left_out]}, inputs=run.checkpoints)


def backbone(run: str | Path, *, steps: Steps = None, revisions: str | None = None, anchor: int | None = None,
             blocks: str | Iterable[int] | None = None, include_bias: bool = False, window: int = 10,
             normalize_rows: bool = False, switches: Iterable[str | tuple[int, int]] = (), metric: str | None = None,
             save_vectors: str | Path | None = None, top_k: int = 6, fit_range: str | tuple[int, int] | None = None,
             role_map: str | Path | None = None, allow_partial_trunk: bool = False, device: str = "auto",
             progress: Any = None, _note: Note = None) -> Report:
    """``ckptaudit backbone RUN``: the streaming SVD of the drift matrix (rows theta(t) - theta(anchor)).

    ``blocks``: "0,2,5" / "0-3" or block indices; ``switches``: "PEAK:TROUGH" strings or (peak, trough) step pairs;
    ``fit_range``: "LO:HI" or (lo, hi) steps. Returns a :class:`Report` of the BackboneReport.
    """
    from ckptaudit.analyses.backbone.run import BackboneSettings, run_backbone
    from ckptaudit.cli.backbone_cmd import parse_blocks, parse_fit_range
    from ckptaudit.cli.common import load_drift_run
    from ckptaudit.cli.options import check_output_path, parse_switch
    from ckptaudit.errors import UsageError

    dev = _device(device)
    if blocks is not None and not isinstance(blocks, str):
        blocks = ",".join(str(int(b)) for b in blocks)
    save_vectors = check_output_path(_path(save_vectors), "--save-vectors")
    with _notes(_note):
        drift = load_drift_run(Path(run), _steps(steps), anchor, revisions)
        if len(drift.checkpoints) < 3:
            raise UsageError(
                f"{run}: backbone needs at least 3 checkpoints (an anchor and 2 drift rows), found {len(drift.checkpoints)}",
                "point it at a run directory with more checkpoints, or widen --steps",
            )
        pairs = [_pair(s, parse_switch) for s in switches]
        hook = _hook(progress)
        settings = BackboneSettings(
            anchor_step=anchor, blocks=parse_blocks(blocks), include_bias=include_bias, window=window,
            normalize_rows=normalize_rows, switches=tuple(pairs), metric=metric, device=dev,
            role_map=_role_map(role_map), top_k_vectors=top_k, allow_partial_trunk=allow_partial_trunk,
            fit_range=parse_fit_range(fit_range if fit_range is None or isinstance(fit_range, str)
                                      else ":".join(str(int(x)) for x in fit_range)),
        )  # fmt: skip
        report = run_backbone(drift, settings, save_vectors=save_vectors, progress=hook,
                              progress_total=hook.set_total if hook is not None else None)
    return Report(report, inputs=drift.checkpoints)


# ------------------------------------------------------------------------------------------- fisher


def fisher(run: str | Path, *, steps: Steps = None, revisions: str | None = None, vectors: str | Path | None = None,
           backbone_run: str | Path | None = None, switch: str | tuple[int, int] | None = None, batches: int = 32,
           batch_size: int | None = None, n_random: int = 10, block: int | None = None, include_bias: bool = False,
           hessian: bool = False, memory_budget: str | int = "2G", top: int = 10, settings: Any = None,
           task: str | None = None, data: str | Path | None = None, seq_len: int | None = None, pack: bool = False,
           train_tokens: int | None = None, dtype: str = "auto", threads: int | None = None, seed: int = 0,
           bootstrap: int = 200, device: str = "auto", progress: Any = None, _note: Note = None) -> Report:
    """``ckptaudit fisher RUN_OR_CKPT``: empirical-Fisher Rayleigh quotients along the backbone, the switching
    direction, PC2..PC6 and random directions, at the checkpoints ``steps`` selects.

    The directions come from ``vectors`` (``backbone(..., save_vectors=...)``) or from a backbone of
    ``backbone_run`` (default: ``run`` itself when it has at least 3 checkpoints). ``settings``: a FisherSettings
    used instead of the individual numbers. Returns a :class:`Report` of the FisherReport.
    """
    import dataclasses

    from ckptaudit.analyses import distributed
    from ckptaudit.analyses.backbone.run import BackboneSettings, run_backbone
    from ckptaudit.analyses.fisher.run import FisherSettings, run_fisher
    from ckptaudit.cli.common import load_run
    from ckptaudit.cli.fisher_cmd import parse_bytes
    from ckptaudit.cli.options import apply_threads, parse_switch, window_spec
    from ckptaudit.errors import UsageError
    from ckptaudit.io.vectors import MemoryVectorSink

    if vectors is not None and backbone_run is not None:
        raise UsageError("give either --vectors or --run, not both")
    dev = _device(device)
    ctx = distributed.active()  # under torchrun rank i % WORLD_SIZE takes mini-batch i
    n_threads = apply_threads(threads)
    t_start = time.perf_counter()
    vectors = _path(vectors)
    with _notes(_note):
        targets = load_run(Path(run), _steps(steps), revisions)
        source_run = load_run(Path(backbone_run)) if backbone_run is not None else None
        if source_run is None and (vectors is None or switch is not None):
            whole = load_run(Path(run), revisions=revisions)
            if len(whole.checkpoints) >= 3:
                source_run = whole
        if vectors is None and source_run is None:
            raise UsageError(f"{run}: no backbone direction: a single checkpoint needs --vectors or --run",
                             "e.g. --vectors backbone.safetensors (from `ckptaudit backbone --save-vectors`)")
        if settings is None:
            budget = memory_budget if isinstance(memory_budget, int) else parse_bytes(memory_budget)
            settings = FisherSettings(batches=batches, batch_size=batch_size, n_random=n_random, block=block,
                                      include_bias=include_bias, hessian=hessian, memory_budget=budget, seed=seed,
                                      top=top, device=dev, bootstrap=bootstrap)
        pair = _pair(switch, parse_switch) if switch is not None else None
        share = settings.batches if ctx is None else len(range(ctx.rank, settings.batches, ctx.world_size))
        hook = _hook(progress)
        directions: Path | MemoryVectorSink | None = vectors
        if directions is None:
            # The backbone pass keeps its vectors in memory. Under torchrun it splits its tensors across the ranks
            # and rank 0 fills the sink, which then goes to every rank.
            directions = MemoryVectorSink(f"backbone vectors of {source_run.path}")
            run_backbone(source_run, BackboneSettings(device=dev, top_k_vectors=6, include_bias=settings.include_bias),
                         save_vectors=directions, progress=hook)
            if ctx is not None:
                directions.share(ctx)
            if _note is not None:
                _note(f"backbone computed from {source_run.path} ({len(source_run.checkpoints)} checkpoints)")
        if hook is not None:
            hook.stage("fisher: gradients", share * len(targets.checkpoints))
        report = run_fisher(targets.checkpoints, settings, directions, task=task, data=_path(data), seq_len=seq_len,
                            switch=pair, switch_run=source_run, progress=hook,
                            windows=window_spec(seq_len, pack, None, train_tokens, settings.seed), dtype=dtype)
    record = {**report.settings, "threads": n_threads,
              "timing_seconds": {"total": time.perf_counter() - t_start,
                                 **{f"step_{c.step}": c.seconds for c in report.checkpoints}}}
    if vectors is None:  # name the run the directions came from
        record["vectors"] = f"backbone of {source_run.path}"
    report = dataclasses.replace(report, settings=record)
    return Report(report, inputs=targets.checkpoints)


# ------------------------------------------------------------------------------------------- resume-probe


def resume_probe(ckpt: str | Path, *, train_steps: int = 50, eval_every: int | None = None,
                 lr_mults: str | float | Iterable[float] = "1,0.1,0.01", warmup_steps: int = 10,
                 boundary_probe: bool = True, reset_optimizer: bool = False, preserve_optimizer: bool = False,
                 collapse_drop: float = 0.2, collapse_ratio: float = 2.0, collapse_loss_floor: float = 0.1,
                 settings: Any = None, seed: int | None = None, task: str | None = None, data: str | Path | None = None,
                 train_data: str | Path | None = None, seq_len: int | None = None, pack: bool = False,
                 eval_tokens: int = 65536, train_tokens: int | None = None, batch_size: int | None = None,
                 dtype: str = "auto", threads: int | None = None, lr: float | None = None,
                 vectors: str | Path | None = None, device: str = "auto", progress: Any = None) -> Report:
    """``ckptaudit resume-probe CKPT``: resume from one checkpoint with its saved optimizer state (CONTROL) and
    with a fresh one (RESET at each of ``lr_mults``, with warm-up, the warm-up boundary probe), on identical batches.

    ``settings``: a ResumeSettings used instead of the individual numbers. ``seed`` None: the checkpoint's own data
    order. Returns a :class:`Report` of the ResumeProbeResult.
    """
    from ckptaudit.analyses.resume.conditions import probe_inputs_from_checkpoint
    from ckptaudit.analyses.resume.run import ResumeSettings, run_resume_probe
    from ckptaudit.cli.options import apply_threads, window_spec
    from ckptaudit.errors import UsageError

    if reset_optimizer and preserve_optimizer:
        raise UsageError("--reset-optimizer and --preserve-optimizer exclude each other", "give at most one")
    mode = "reset" if reset_optimizer else "preserve" if preserve_optimizer else "both"
    dev = _device(device)
    n_threads = apply_threads(threads)
    t0 = time.perf_counter()
    if settings is None:
        settings = ResumeSettings(
            steps=train_steps, eval_every=eval_every, lr_mults=_floats(lr_mults, "--lr-mult", "1,0.1,0.01"),
            warmup_steps=warmup_steps, boundary_probe=boundary_probe, collapse_drop=collapse_drop,
            collapse_ratio=collapse_ratio, collapse_loss_floor=collapse_loss_floor,
            seed=seed if seed is not None else 0, mode=mode, device=dev,
        )  # fmt: skip
    spec = window_spec(seq_len, pack, eval_tokens, train_tokens, seed if seed is not None else 0)
    inputs = probe_inputs_from_checkpoint(Path(ckpt), task=task, seed=seed, device=dev, data=_path(data), lr=lr,
                                          windows=spec, batch_size=batch_size, dtype=dtype,
                                          train_data=_path(train_data))
    t1 = time.perf_counter()
    result = run_resume_probe(inputs, settings, vectors=_path(vectors), progress=_hook(progress))
    result.settings["timing_seconds"] = {"load": t1 - t0, **result.settings["timing_seconds"],
                                         "total": time.perf_counter() - t0}
    result.settings["threads"] = n_threads
    return Report(result, inputs=[inputs.checkpoint] if inputs.checkpoint is not None else [])


# ------------------------------------------------------------------------------------------- embeddings


def classify_embeddings(model: str | Path, *, pairs: int = 200_000, exact: bool = False, lora_lr: float = 2e-4,
                        tokens_from: str | Path | None = None, tile: int = 4096, bootstrap: int = 200, seed: int = 0,
                        device: str = "auto", progress: Any = None) -> EmbeddingsReport:
    """``ckptaudit classify-embeddings MODEL``: the bulk geometry of the normalised input embeddings (and of the LM
    head when untied), the class A/B, LoRA sufficiency and the predicted critical LoRA learning rate.

    ``model``: a local model directory, a weight file, or a hub id already cached. ``tokens_from``: "tokenizer" or
    a file of token ids to keep. Returns an :class:`EmbeddingsReport`.
    """
    from ckptaudit.analyses.embeddings.run import embedding_matrices, overlap_stats
    from ckptaudit.cli.classify_embeddings_cmd import excluded_token_ids
    from ckptaudit.io.models import resolve_model_path

    dev = _device(device)
    path = Path(resolve_model_path(str(model)))
    mats = embedding_matrices(path)
    tied = "head" not in mats
    exclude = excluded_token_ids(str(tokens_from), path, mats["embed"].shape[0]) if tokens_from else None
    hook = _hook(progress)
    results = {}
    for role, M in mats.items():
        if hook is not None:
            hook.stage(f"{role}: overlaps", M.shape[0] * (M.shape[0] - 1) // 2 if exact else pairs)
        results[role] = overlap_stats(M, pairs=pairs, exact=exact, seed=seed, device=dev, tile=tile, exclude=exclude,
                                      progress=hook, lora_lr=lora_lr, tied_head=tied, bootstrap=bootstrap)
    return EmbeddingsReport(results, path)


def born_gap(model: str | Path, contexts: str | Path, *, nucleus: float = 0.9, strict: bool = False,
             device: str = "auto", progress: Any = None) -> Report:
    """``ckptaudit born-gap MODEL --contexts FILE``: near-synonym density-matrix observables at the last position of
    each context (``contexts``: a JSONL file, or "near-synonyms" for the pairs shipped with ckptaudit); unusable
    contexts are skipped and listed by file line (``strict``: the first is an error).

    Returns a :class:`Report` of the BornGapResult.
    """
    from ckptaudit.analyses.born_gap import born_gap as run_born_gap
    from ckptaudit.analyses.born_gap import load_contexts
    from ckptaudit.cli.common import load_model_input

    dev = _device(device)
    ctxs = load_contexts(Path(contexts))
    ckpt, tok, net = load_model_input(str(model), dev)
    hook = _hook(progress)
    if hook is not None:
        hook.set_total(len(ctxs))
    result = run_born_gap(net, tok, ctxs, nucleus=nucleus, device=dev, progress=hook, strict=strict)
    return Report(result, inputs=[ckpt])


# ------------------------------------------------------------------------------------------- trajectory analyses


def _trajectory_report(result: Any, inputs: list, precision: dict, held_out: Any, n_threads: int, t0: float) -> Report:
    """The report entries every model-running trajectory command adds (precision, data selection, threads, time)."""
    selection = held_out.selection() if hasattr(held_out, "selection") else None
    extra = {k: v for k, v in {"precision": precision, "eval_data": selection, "threads": n_threads,
                               "timing_seconds": {"total": time.perf_counter() - t0}}.items() if v is not None}
    return Report(result, extra, extra, inputs=inputs)


def regimes(run: str | Path, *, probes: str | Path | None = None, thresholds: str | tuple[float, float] | None = None,
            variance_window: int = 5, bootstrap: int = 200, loss: bool = True, task: str | None = None,
            data: str | Path | None = None, seq_len: int | None = None, pack: bool = False, eval_tokens: int = 65536,
            steps: Steps = None, revisions: str | None = None, seed: int = 0, dtype: str = "auto",
            threads: int | None = None, device: str = "auto", progress: Any = None, _note: Note = None) -> Report:
    """``ckptaudit regimes RUN``: regimes (stable / transition / chaotic) from the cosine s_t of consecutive
    checkpoints' probe fingerprints, the activation variance, the loss curvature and a bootstrap over probes.

    ``thresholds``: "LOW,HIGH" or (low, high) on s_t (default: adaptive). ``loss=False`` is ``--no-loss``.
    Returns a :class:`Report` of the RegimesResult.
    """
    from ckptaudit.analyses.regimes.run import run_regimes
    from ckptaudit.cli.inputs import precision_of, probe_set, regime_losses, task_data, trajectory_run
    from ckptaudit.cli.options import apply_threads, window_spec

    dev = _device(device)
    n_threads = apply_threads(threads)
    t0 = time.perf_counter()
    fixed = _thresholds(thresholds)
    data = _path(data)
    with _notes(_note):
        r = trajectory_run(Path(run), _steps(steps), revisions)
        held_out = task_data(r[0], task, data, required=False, windows=window_spec(seq_len, pack, eval_tokens, None, seed))
        probe_set = probe_set(r[0], _path(probes), held_out, seed)
        evaluate, logged, source = regime_losses(r, held_out, data, not loss)
        torch_dtype, precision = precision_of(dtype, r[0], dev)
        hook = _hook(progress)
        if hook is not None:
            hook.set_total(len(r))
        result = run_regimes(r, probe_set, fixed, dev, progress=hook, evaluate=evaluate, losses=logged,
                             loss_source=source, variance_window=variance_window, bootstrap=bootstrap, seed=seed,
                             dtype=torch_dtype)
    return _trajectory_report(result, list(r), precision, held_out, n_threads, t0)


def extrapolate(run: str | Path, *, predictors: str | Iterable[str] = "linear,quadratic,quadratic-fit,momentum,adam-step",
                K: str | int | Iterable[int] = "5,10,25,50,75,100",  # noqa: N803 - the command's --K
                cascades: Iterable[str | tuple[int, int]] = (), time_steps: bool = False, tolerance: float = 0.05,
                sigma_window: int = 5, skip_chaotic: bool = False, data: str | Path | None = None,
                task: str | None = None, seq_len: int | None = None, pack: bool = False, eval_tokens: int = 65536,
                probes: str | Path | None = None, thresholds: str | tuple[float, float] | None = None,
                landscape: bool = False, confirm_stable: int | None = None, moment_dtype: str | None = None,
                bootstrap: int = 200, steps: Steps = None, revisions: str | None = None, seed: int = 0,
                dtype: str = "auto", threads: int | None = None, device: str = "auto", progress: Any = None,
                _note: Note = None) -> Report:
    """``ckptaudit extrapolate RUN``: predict theta(t+K) from each checkpoint, validate its held-out loss, accept by
    the strict / adaptive / proximity criteria, rates per predictor, K and regime with Wilson and bootstrap
    intervals; ``landscape`` probes the loss along each prediction, ``confirm_stable`` trusts a prediction only
    after K consecutive stable checkpoints, ``moment_dtype`` rounds the stored moments first.

    ``K``: "5,10,25" or ints; ``cascades``: "D:K" strings or (D, K) pairs; ``time_steps`` is ``--time``.
    Returns a :class:`Report` of the ExtrapolateResult.
    """
    from ckptaudit.analyses.extrapolate.predictors import MOMENT_DTYPES, PREDICTORS, time_training_steps
    from ckptaudit.analyses.extrapolate.run import ExtrapolateSettings, run_extrapolate
    from ckptaudit.cli.inputs import (
        cascade_specs,
        int_list,
        precision_of,
        probe_set,
        task_data,
        trajectory_run,
    )
    from ckptaudit.cli.options import apply_threads, window_spec
    from ckptaudit.errors import UsageError

    dev = _device(device)
    n_threads = apply_threads(threads)
    t0 = time.perf_counter()
    spec = predictors if isinstance(predictors, str) else ",".join(predictors)
    chosen = tuple(p.strip() for p in spec.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PREDICTORS]
    if unknown or not chosen:
        raise UsageError(f"--predictor {spec}: unknown {', '.join(unknown) or 'empty list'}", f"choose from {', '.join(PREDICTORS)}")
    if moment_dtype is not None and moment_dtype not in MOMENT_DTYPES:
        raise UsageError(f"--moment-dtype {moment_dtype}: unknown", f"choose from {', '.join(MOMENT_DTYPES)}")
    ks = K if isinstance(K, str) else str(K) if isinstance(K, int) else ",".join(str(int(k)) for k in K)
    with _notes(_note):
        r = trajectory_run(Path(run), _steps(steps), revisions)
        torch_dtype, precision = precision_of(dtype, r[-1], dev)
        settings = ExtrapolateSettings(
            predictors=chosen, ks=int_list(ks, "--K"),
            cascades=cascade_specs([c if isinstance(c, str) else ":".join(str(int(x)) for x in c) for c in cascades]),
            tolerance=tolerance, sigma_window=sigma_window, skip_chaotic=skip_chaotic,
            thresholds=_thresholds(thresholds), device=dev, dtype=torch_dtype, landscape=landscape,
            confirm_stable=confirm_stable, moment_dtype=moment_dtype, bootstrap=bootstrap, seed=seed,
        )  # fmt: skip
        held_out = task_data(r[-1], task, _path(data), required=True, windows=window_spec(seq_len, pack, eval_tokens, None, seed))
        probe_set = probe_set(r[0], _path(probes), held_out, seed)

        def evaluate(model: Any) -> float:
            return float(held_out.evaluate(model, "validation")[0])

        def timer(ckpt: Any, ks: Sequence[int]) -> Any:
            # K real steps from the checkpoint: the run's own trainer, else resume-probe's loop on --data's windows
            return time_training_steps(ckpt.path, ks, dev, data=_path(data), task=task, dtype=dtype,
                                       windows=window_spec(seq_len, pack, eval_tokens, None, seed))

        hook = _hook(progress)
        if hook is not None:
            hook.set_total(2 * len(r))
        result = run_extrapolate(r, evaluate, probe_set, settings, timer=timer if time_steps else None, progress=hook)
    return _trajectory_report(result, list(r), precision, held_out, n_threads, t0)


def cross_seed(runs: Sequence[str | Path], *, probes: str | Path | None = None,
               thresholds: str | tuple[float, float] | None = None, task: str | None = None,
               data: str | Path | None = None, seq_len: int | None = None, pack: bool = False, eval_tokens: int = 65536,
               steps: Steps = None, seed: int = 0, dtype: str = "auto", threads: int | None = None,
               device: str = "auto", progress: Any = None, _note: Note = None) -> Report:
    """``ckptaudit cross-seed RUN RUN ...``: final-loss coefficient of variation, regime onsets per seed, regime
    agreement at matched steps and linear CKA between the seeds' probe representations.

    Returns a :class:`Report` of the CrossSeedResult.
    """
    from ckptaudit.analyses.cross_seed import run_cross_seed
    from ckptaudit.cli.inputs import precision_of, probe_set, task_data, trajectory_run
    from ckptaudit.cli.options import apply_threads, window_spec
    from ckptaudit.errors import UsageError

    run_dirs = [Path(p) for p in runs]
    if len(run_dirs) < 2:
        raise UsageError("cross-seed needs at least two runs", "e.g. ckptaudit cross-seed runs/seed0 runs/seed1")
    dev = _device(device)
    n_threads = apply_threads(threads)
    t0 = time.perf_counter()
    fixed = _thresholds(thresholds)
    with _notes(_note):
        loaded = [trajectory_run(p, _steps(steps)) for p in run_dirs]
        names = [p.name for p in run_dirs]
        labels = names if len(set(names)) == len(names) else [str(p) for p in run_dirs]
        spec = window_spec(seq_len, pack, eval_tokens, None, seed)
        datas = [task_data(r[-1], task, _path(data), required=False, windows=spec) for r in loaded]
        torch_dtype, precision = precision_of(dtype, loaded[0][-1], dev)
        # One probe set for every seed (CKA compares the same inputs): built from the first run.
        probe_set = probe_set(loaded[0][0], _path(probes), datas[0], seed)
        evaluators = [(lambda m, d=d: float(d.evaluate(m, "validation")[0])) if d is not None else None for d in datas]
        hook = _hook(progress)
        if hook is not None:
            hook.set_total(sum(len(r) for r in loaded))
        result = run_cross_seed(list(zip(labels, loaded, strict=True)), probe_set, fixed, evaluators, dev,
                                progress=hook, dtype=torch_dtype)
    return _trajectory_report(result, [c for r in loaded for c in r], precision, datas[0], n_threads, t0)


# ------------------------------------------------------------------------------------------- gate


def run_gate(path: str | Path, policy: Any, *, steps: Steps = None, device: str = "auto", seed: int = 0,
         progress: Any = None, _note: Note = None) -> Report:
    """``ckptaudit gate PATH --policy FILE``: run the checks ``policy`` (a policy TOML file, or a Policy from
    :func:`ckptaudit.gate.parse_policy`) enables on the run or checkpoint at ``path``. (Not ``ckptaudit.gate``:
    that name is the package of the checks.)

    Returns a :class:`Report` of the GateResult, whose ``to_json()`` is ``gate --json -``; a failed gate is
    ``report.passed == False`` (the command exits 1), not an exception. A bad policy raises PolicyError.
    """
    from ckptaudit.cli.common import load_run
    from ckptaudit.gate import Policy, load_policy
    from ckptaudit.gate import run_gate as gate_run

    pol = policy if isinstance(policy, Policy) else load_policy(Path(policy))
    dev = _device(device)
    with _notes(_note):
        run = load_run(Path(path), _steps(steps))
        hook = _hook(progress)
        if hook is not None:
            hook.set_total(len(pol.checks))
        result = gate_run(run, pol, device=dev, seed=seed, progress=hook)
    return Report(result, inputs=run.checkpoints if pol.target == "all" else run.checkpoints[-1:])


# ------------------------------------------------------------------------------------------- parameter names


def _keyword_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose CkptAuditErrors name parameters as its keywords (``window=5``), not as the command's options;
    the command line re-spells them with its own options (cli/app.py). A name ``fn`` lacks that differs from one
    of its keywords by a plural "s" (an analysis' ``switch``, the API's ``switches``) is spelled as that keyword."""
    import functools
    import inspect as _inspect

    from ckptaudit.errors import matching_name

    keywords = set(_inspect.signature(fn).parameters)

    def spelling(name: str, with_value: bool) -> str:
        return (matching_name(name, keywords) or name) + "="

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        from ckptaudit.errors import CkptAuditError

        try:
            return fn(*args, **kwargs)
        except CkptAuditError as e:
            e.spelling = spelling
            raise

    return call


for _name in __all__:
    if _name not in ("Report", "EmbeddingsReport"):
        globals()[_name] = _keyword_errors(globals()[_name])
del _name
