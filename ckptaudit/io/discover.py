"""A run directory -> its checkpoints, ordered by training step.

Recognised layouts (``Checkpoint.layout``):

- "hf-trainer": Hugging Face Trainer ``checkpoint-N/`` folders (weights + optimizer.pt, scheduler.pt,
  trainer_state.json, rng_state[_rank].pth). Step: ``global_step`` of trainer_state.json, else N.
- "accelerate": ``Accelerator.save_state`` folders (model.safetensors / model_0.safetensors, optimizer.bin,
  scheduler.bin, random_states_R.pkl). Step: from the folder name (checkpoint_N, step_N, ...). With Accelerate's
  automatic naming, N counts saves, not optimizer steps; the order is right either way.
- "lightning": ``*.ckpt`` files (one file holds weights and optimizer). Step: ``step=N`` in the name
  (epoch=E-step=N.ckpt), else the ``global_step`` stored in the file. ``last*.ckpt`` is Lightning's copy of the
  newest checkpoint: it is dropped when another checkpoint has the same step.
- "state-dict": loose *.safetensors / *.pt / *.pth / *.bin files. Step: step_N / step-N / ckpt_N / ckpt-N in the
  name, else the name's trailing integer.
- "gguf": GGUF files (step from the name as for state-dict files).
- "dcp": torch.distributed.checkpoint folders (step from the folder name).
- "model-dir": a folder of model weights without training state (step from the folder name).

A checkpoint directory or file passed directly is a run of one (step from trainer_state.json, the name, or 0).
A folder that holds both step-named checkpoints and model files of its own (a Trainer ``output_dir`` after
``save_model``) is a run of the step-named checkpoints; its own top-level model files are not a checkpoint.
Nothing is guessed: an unknown step, two checkpoints with one step, or a --steps spec naming absent steps are
errors that name the paths and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError, UsageError
from ckptaudit.io.numbers import parse_int
from ckptaudit.io.tensors import (
    TensorSource,
    detect_format,
    find_weights,
    is_training_state_file,
    open_tensors,
    safe_torch_load,
)

LAYOUTS = ("hf-trainer", "accelerate", "lightning", "state-dict", "gguf", "dcp", "model-dir")

# Step-bearing names. Directories need one of these; files may also use a trailing integer.
_DIR_STEP_RES = (
    re.compile(r"^(?:checkpoint|ckpt|step|iter|iteration)[-_=]?(\d+)$", re.I),
    re.compile(r"(?:^|[^a-z])step[-_=]?(\d+)(?:$|[^0-9])", re.I),
)
_TRAILING_INT_RE = re.compile(r"(\d+)$")
_LIGHTNING_STEP_RE = re.compile(r"(?:^|[^a-z])step=(\d+)", re.I)

# Files that are parts of a model folder (not separate checkpoints) and folders that are parts of a checkpoint.
_MODEL_PART_RE = re.compile(
    r"^(model|pytorch_model)(_\d+)?(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$|^model\.bin$|^adapter_model\.(safetensors|bin)$"
)
_SKIP_DIR_RE = re.compile(r"^(pytorch_model_fsdp_\d+|optimizer_\d+|global_step\d+|tmp-checkpoint-\d+)$")
_TORCH_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_HF_MARKERS_RE = re.compile(r"^(trainer_state\.json|optimizer\.pt|scheduler\.pt|rng_state(_\d+)?\.pth|training_args\.bin)$")
_ACCELERATE_MARKERS_RE = re.compile(
    r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin|random_states_\d+\.pkl|model_0\.safetensors)$"
)


# ------------------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: where its files are and how to read them.

    step: training step (optimizer steps for Trainer/Lightning; see the module docstring for the rest).
    path: the checkpoint folder, or the file for single-file layouts. weight_files: the files holding the model
    tensors. optimizer_file is the .ckpt itself for Lightning. config_file: config.json of the folder, else of the
    run directory, else None. weights_entry: the file (or index, or DCP folder) the tensors open from, found at
    discovery so that ``tensors()`` does not search the folder again.
    """

    step: int
    path: Path
    layout: str
    weight_files: tuple[Path, ...]
    optimizer_file: Path | None = None
    scheduler_file: Path | None = None
    trainer_state_file: Path | None = None
    rng_files: tuple[Path, ...] = ()
    config_file: Path | None = None
    weights_entry: Path | None = None  # what open_tensors opens (found once at discovery); None: ``path``

    @property
    def directory(self) -> Path:
        """The folder holding the checkpoint's files: ``path`` itself, or its parent for single-file layouts."""
        return self.path if self.path.is_dir() else self.path.parent

    def tensors(self) -> TensorSource:
        """Open the model tensors (lazily). Use as a context manager."""
        return open_tensors(self.weights_entry or self.path)

    def config(self) -> dict | None:
        """The parsed config.json, or None when the checkpoint has none."""
        return _read_json(self.config_file) if self.config_file else None

    def trainer_state(self) -> dict | None:
        """The parsed trainer_state.json (Trainer layouts), or None."""
        return _read_json(self.trainer_state_file) if self.trainer_state_file else None


@dataclass(frozen=True)
class Run:
    """The checkpoints of one training run, sorted by step (steps are unique).

    Indexing by position gives a Checkpoint (a slice gives a Run); ``by_step`` looks up by training step.
    """

    path: Path
    checkpoints: tuple[Checkpoint, ...]

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return Run(self.path, self.checkpoints[index])
        return self.checkpoints[index]

    @property
    def steps(self) -> list[int]:
        """The training steps, ascending."""
        return [c.step for c in self.checkpoints]

    def by_step(self, step: int) -> Checkpoint:
        """The checkpoint at training step ``step``; LayoutError listing the available steps otherwise."""
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise LayoutError(f"{self.path}: no checkpoint at step {step}", hint=f"available steps: {_fmt_steps(self.steps)}")


# ------------------------------------------------------------------------------------------ --steps


@dataclass(frozen=True)
class StepFilter:
    """A parsed --steps spec (see ``parse_steps``); ``select`` applies it to a run's steps."""

    spec: str
    kind: str  # "list" | "range" | "stride"
    items: tuple[int | str, ...] = ()  # for "list": steps (>= 0), or "first" / "last" / negative positions
    start: int | None = None
    stop: int | None = None
    every: int | None = None

    def select(self, steps: Sequence[int]) -> list[int]:
        """The selected steps of ``steps`` (ascending, unique). LayoutError when a named step does not exist or
        nothing is selected; the message lists the available steps."""
        avail = sorted(set(int(s) for s in steps))
        hint = f"available steps: {_fmt_steps(avail)}"
        if not avail:
            raise LayoutError(f"--steps {self.spec!r}: the run has no checkpoints")
        chosen: list[int] = []
        if self.kind == "list":
            missing = []
            for it in self.items:
                if it == "first":
                    chosen.append(avail[0])
                elif it == "last":
                    chosen.append(avail[-1])
                elif isinstance(it, int) and it < 0:
                    if -it > len(avail):
                        missing.append(str(it))
                    else:
                        chosen.append(avail[it])
                elif it in avail:
                    chosen.append(int(it))
                else:
                    missing.append(str(it))
            if missing:
                raise LayoutError(f"--steps {self.spec!r}: no checkpoint at step {', '.join(missing)}", hint=hint)
        elif self.kind == "stride":
            chosen = avail[:: int(self.every or 1)]
        else:
            lo = avail[0] if self.start is None else self.start
            hi = avail[-1] if self.stop is None else self.stop
            chosen = [s for s in avail if lo <= s <= hi and (self.every is None or (s - lo) % self.every == 0)]
        if not chosen:
            raise LayoutError(f"--steps {self.spec!r} selects no checkpoint", hint=hint)
        return sorted(set(chosen))


def parse_steps(spec: str) -> StepFilter:
    """Parse a --steps spec into a StepFilter. Steps are training steps, except where "position" is said.

    - "100,200,500": exactly these steps (each must exist). Items may also be "first", "last" or a negative
      position ("-1" = last checkpoint, "-2" = the one before).
    - "first" / "last" / "-1": one checkpoint.
    - "100:1000": every existing step s with 100 <= s <= 1000 (inclusive); either end may be left out.
    - "100:1000:200": steps s in [100, 1000] with (s - 100) % 200 == 0; the start is required ("100::200" runs
      to the last step).
    - "::K": every K-th checkpoint by position (the 1st, (K+1)-th, ...), whatever the steps are.

    A malformed spec raises UsageError; a spec naming absent steps fails later, in ``StepFilter.select``.
    """
    s = (spec or "").strip().replace(" ", "")
    bad = UsageError(
        f"--steps {spec!r}: not a step spec",
        hint="use e.g. 100,200,500 | 100:1000 | 100:1000:200 | ::2 | first | last | -1",
    )
    if not s:
        raise bad
    if ":" in s:
        parts = s.split(":")
        if len(parts) > 3 or not all(p == "" or (p.isascii() and p.isdigit()) for p in parts):
            raise bad
        nums = [parse_int(p, "--steps") if p else None for p in parts] + [None] * (3 - len(parts))
        start, stop, every = nums
        if every == 0:
            raise UsageError(f"--steps {spec!r}: the stride must be at least 1")
        if start is None and stop is None and every is not None:
            return StepFilter(spec, "stride", every=every)
        if every is not None and start is None:
            raise UsageError(f"--steps {spec!r}: give the start step the stride counts from (e.g. 0:{stop}:{every})")
        if start is not None and stop is not None and stop < start:
            raise UsageError(f"--steps {spec!r}: the range ends before it starts")
        return StepFilter(spec, "range", start=start, stop=stop, every=every)
    items: list[int | str] = []
    for it in s.split(","):
        low = it.lower()
        if low in ("first", "last"):
            items.append(low)
        elif re.fullmatch(r"-?[0-9]+", it):
            items.append(parse_int(it, "--steps"))
        else:
            raise bad
    return StepFilter(spec, "list", items=tuple(items))


# ------------------------------------------------------------------------------------------ discovery


@dataclass
class _Candidate:
    """A checkpoint found during scanning, before its step is known to be valid."""

    path: Path
    layout: str
    step: int | None
    parts: dict = field(default_factory=dict)
    alias: bool = False  # Lightning last*.ckpt

    def build(self) -> Checkpoint:
        assert self.step is not None
        return Checkpoint(step=self.step, path=self.path, layout=self.layout, **self.parts)


def discover_run(path: Path | str, steps: str | None = None) -> Run:
    """Find the checkpoints of the run at ``path`` (a run directory, one checkpoint folder, or one file), sorted
    by step, optionally filtered by a --steps spec (see ``parse_steps``).

    Raises InputNotFoundError (no such path) or LayoutError (no checkpoints, a step that cannot be determined,
    two checkpoints with the same step, a --steps spec naming absent steps); messages name the paths and the fix.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputNotFoundError(f"{root}: no such file or directory", hint="check the run directory path")
    if root.is_file():
        cand = _file_candidate(root, run_dir=root.parent, single=True)
        if cand is None:
            raise LayoutError(f"{root}: not a checkpoint file", hint="pass a weight file or a run directory")
        found = [cand]
    else:
        found = _scan(root, depth=0)
    ckpts = _order(found)
    if steps is not None:
        keep = set(parse_steps(steps).select([c.step for c in ckpts]))
        ckpts = [c for c in ckpts if c.step in keep]
    return Run(root, tuple(ckpts))


def _scan(d: Path, depth: int) -> list[_Candidate]:
    """The checkpoints of run directory ``d`` (or ``d`` itself as a run of one)."""
    children: list[_Candidate] = []
    seen: list[str] = []
    for child in sorted(d.iterdir()):
        if child.name.startswith("."):
            continue
        seen.append(child.name + ("/" if child.is_dir() else ""))
        if child.is_dir():
            if _SKIP_DIR_RE.match(child.name):
                continue
            cand = _dir_candidate(child, run_dir=d, single=False)
        else:
            cand = _file_candidate(child, run_dir=d, single=False)
        if cand is not None:
            children.append(cand)
    self_weights = _weights_or_none(d)
    if children and (any(c.step is not None for c in children) or self_weights is None):
        unknown = [c for c in children if c.step is None]
        if unknown:
            raise LayoutError(
                f"{d}: cannot tell the step of {', '.join(c.path.name for c in unknown)}",
                hint="name checkpoints step_N / checkpoint-N (or keep trainer_state.json), move other model "
                "files out of the run directory, or pass one checkpoint directly",
            )
        return children
    if self_weights is not None or (d / "trainer_state.json").is_file():
        cand = _dir_candidate(d, run_dir=d.parent, single=True)
        if cand is not None:
            return [cand]
    if depth == 0 and (d / "checkpoints").is_dir():  # Lightning logs / Accelerate automatic naming
        return _scan(d / "checkpoints", depth + 1)
    raise LayoutError(
        f"{d}: no checkpoints found (saw: {', '.join(seen[:15]) or 'nothing'}{' ...' if len(seen) > 15 else ''})",
        hint="pass a run directory of checkpoint-N/ step_N folders or *.safetensors/*.pt/*.ckpt/*.gguf files",
    )


def _order(found: list[_Candidate]) -> list[Checkpoint]:
    """Sort by step; drop Lightning last*.ckpt copies of a step that has a named checkpoint; refuse duplicates."""
    by_step: dict[int, list[_Candidate]] = {}
    for c in found:
        by_step.setdefault(int(c.step), []).append(c)  # type: ignore[arg-type]
    out = []
    for step in sorted(by_step):
        group = by_step[step]
        if len(group) > 1:
            group = [c for c in group if not c.alias] or group[:1]
        if len(group) > 1:
            raise LayoutError(
                f"two checkpoints have step {step}: {group[0].path} and {group[1].path}",
                hint="remove or rename one of them, or pass the one you mean directly",
            )
        out.append(group[0].build())
    return out


def _weights_or_none(d: Path) -> tuple[Path, tuple[Path, ...]] | None:
    try:
        return find_weights(d)
    except LayoutError:
        return None


def _dir_candidate(d: Path, run_dir: Path, single: bool) -> _Candidate | None:
    """A checkpoint folder's layout, files and step; None when ``d`` holds no checkpoint."""
    names = {c.name for c in d.iterdir() if c.is_file()}
    name_step = _step_from_name(d.name, trailing=False)
    if name_step is None and not single:
        found = _weights_or_none(d)  # an unnamed folder with ambiguous files is not treated as a checkpoint
    else:
        found = find_weights(d)
    hf = any(_HF_MARKERS_RE.match(n) for n in names)
    if found is None:
        if hf and (name_step is not None or single):
            raise LayoutError(
                f"{d}: a Trainer checkpoint without model weights ckptaudit can read (DeepSpeed-only?)",
                hint="save with model.safetensors (e.g. stage3_gather_16bit_weights_on_model_save) or convert it",
            )
        return None
    entry, weight_files = found
    if entry == d:
        layout = "dcp"
    elif hf:
        layout = "hf-trainer"
    elif any(_ACCELERATE_MARKERS_RE.match(n) for n in names):
        layout = "accelerate"
    else:
        layout = "model-dir"
    parts: dict[str, Any] = {"weight_files": weight_files, "weights_entry": entry,
                             "config_file": _first_file(d / "config.json", run_dir / "config.json")}
    step = name_step
    if layout == "hf-trainer":
        parts["optimizer_file"] = _first_file(d / "optimizer.pt") or _first_dir(d / "optimizer_0")
        parts["scheduler_file"] = _first_file(d / "scheduler.pt")
        parts["trainer_state_file"] = _first_file(d / "trainer_state.json")
        parts["rng_files"] = tuple(sorted(p for p in d.glob("rng_state*.pth")))
        if parts["trainer_state_file"] is not None:
            state = _read_json(parts["trainer_state_file"])
            global_step = state.get("global_step")
            if isinstance(global_step, int) and not isinstance(global_step, bool):
                if global_step < 0:
                    raise CorruptFileError(f"{parts['trainer_state_file']}: global_step {global_step} is negative",
                                           hint="re-save or restore the file")
                step = global_step
    elif layout == "accelerate":
        parts["optimizer_file"] = _first_file(d / "optimizer.bin")
        parts["scheduler_file"] = _first_file(d / "scheduler.bin")
        parts["rng_files"] = tuple(sorted(d.glob("random_states_*.pkl")))
    if step is None and single:
        step = 0
    return _Candidate(d, layout, step, parts)


def _file_candidate(f: Path, run_dir: Path, single: bool) -> _Candidate | None:
    """A single-file checkpoint's layout and step; None when ``f`` is not one (training state, shards, text)."""
    if not single and (is_training_state_file(f.name) or _MODEL_PART_RE.match(f.name)):
        return None
    fmt = _weight_format(f)
    if fmt is None:
        if single:  # say precisely why a file given directly is not readable
            detect_format(f)
        return None
    if fmt in ("torch-zip", "torch-legacy") and not single and f.suffix.lower() not in _TORCH_FILE_SUFFIXES:
        return None  # other pickles (*.pkl) next to checkpoints are training state, not weights
    config = _first_file(run_dir / "config.json")
    if fmt == "safetensors-index":
        return _Candidate(f, "model-dir", _step_from_name(f.parent.name, trailing=False) or 0,
                          {"weight_files": tuple(open_tensors(f).files()), "config_file": _first_file(f.parent / "config.json")})
    if fmt in ("torch-zip", "torch-legacy") and (f.suffix.lower() == ".ckpt" or _LIGHTNING_STEP_RE.search(f.stem)):
        m = _LIGHTNING_STEP_RE.search(f.stem)
        step = int(m.group(1)) if m else _lightning_global_step(f)
        return _Candidate(f, "lightning", step, {"weight_files": (f,), "optimizer_file": f, "config_file": config},
                          alias=f.stem.lower().startswith("last"))
    step = _step_from_name(f.stem, trailing=True)
    if step is None and single:
        step = 0
    return _Candidate(f, "gguf" if fmt == "gguf" else "state-dict", step, {"weight_files": (f,), "config_file": config})


def _weight_format(f: Path) -> str | None:
    """The format of a possible weight file from its first bytes, or None (text, logs, other binaries)."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or (len(head) == 9 and head[8:9] == b"{"):
        try:
            return detect_format(f)
        except LayoutError:
            return None
    if head.lstrip()[:1] == b"{" and f.name.endswith(".index.json"):
        try:
            return detect_format(f)
        except LayoutError:
            return None
    return None


def _lightning_global_step(f: Path) -> int | None:
    """``global_step`` stored in a Lightning .ckpt (weights-only load, memory-mapped), or None."""
    obj = safe_torch_load(f)
    step = obj.get("global_step") if isinstance(obj, dict) else None
    return int(step) if isinstance(step, int) else None


def _step_from_name(name: str, trailing: bool) -> int | None:
    for rx in _DIR_STEP_RES:
        m = rx.search(name)
        if m:
            return int(m.group(1))
    if trailing:
        m = _TRAILING_INT_RE.search(name)
        if m:
            return int(m.group(1))
    return None


def _first_file(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _first_dir(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_dir()), None)


def _read_json(path: Path) -> dict:
    """A JSON object of the checkpoint (config.json, trainer_state.json), read with io.jsonio's limits."""
    from ckptaudit.io.jsonio import read_json

    return read_json(path)


def _fmt_steps(steps: Sequence[int], limit: int = 20) -> str:
    steps = list(steps)
    if len(steps) <= limit:
        return ", ".join(map(str, steps)) or "none"
    return ", ".join(map(str, steps[: limit // 2])) + ", ..., " + ", ".join(map(str, steps[-limit // 2:]))
