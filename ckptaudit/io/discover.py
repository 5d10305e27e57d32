"""A run directory -> its checkpoints, ordered by training step.

Recognised layouts (``Checkpoint.layout``):

- "hf-trainer": Hugging Face Trainer ``checkpoint-N/`` folders (weights + optimizer.pt, scheduler.pt,
  trainer_state.json, rng_state[_rank].pth). Step: ``global_step`` of trainer_state.json, else N.
- "accelerate": ``Accelerator.save_state`` folders (model.safetensors / model_0.safetensors, optimizer.bin,
  scheduler.bin, random_states_R.pkl). Step: from the folder name (checkpoint_N, step_N, ...); with Accelerate's
  automatic naming (``checkpoints/checkpoint_K``, K counts saves) the optimizer state's step count.
- "lightning": ``*.ckpt`` files (one file holds weights and optimizer). Step: ``step=N`` in the name
  (epoch=E-step=N.ckpt), else the ``global_step`` stored in the file. ``last*.ckpt`` is Lightning's copy of the
  newest checkpoint: it is dropped when another checkpoint has the same step. Read by ``ckptaudit.io.lightning``
  (module prefix stripped by matching the model's names, config from config.json or hyper_parameters).
- "state-dict": loose *.safetensors / *.pt / *.pth / *.bin files. Step: step_N / step-N / ckpt_N / ckpt-N in the
  name, else the name's trailing integer.
- "gguf": GGUF files (step from the name as for state-dict files).
- "nanogpt": nanoGPT ``ckpt.pt`` / ``ckpt_N.pt`` (recognised by content: model, model_args, iter_num). Step:
  ``iter_num``. Read by ``ckptaudit.io.nanogpt``.
- "dcp": torch.distributed.checkpoint folders (step from the folder name), e.g. torchtitan's
  ``RUN/checkpoint/step-N/``: only the model's tensors are weights; an ``optimizer`` / ``lr_scheduler``
  subtree saved beside them is the optimizer / scheduler state (``ckptaudit.io.dcp``).
- "model-dir": a folder of model weights without training state (step from the folder name).
- "peft": PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors; Trainer files beside them),
  read by ``ckptaudit.io.peft`` as merged deltas; the model is the base model named by the adapter.
- "deepspeed": DeepSpeed engine checkpoints ``SAVE_DIR/global_stepN/`` (step N, else the recorded
  global_steps), read by ``ckptaudit.io.deepspeed`` without DeepSpeed's code. Inside a Trainer
  ``checkpoint-N/`` the engine folder is that checkpoint's optimizer and scheduler state.

A checkpoint directory or file passed directly is a run of one (step from trainer_state.json, the name, or 0).
A folder that holds both step-named checkpoints and other model files (a Trainer ``output_dir`` after
``save_model``, a ``best/`` or ``sharded-final/`` folder, ``runs/`` logs) is a run of the step-named checkpoints;
the rest is listed in ``Run.left_out`` with the reason, never given a guessed step. config.json is looked up in
the checkpoint, the run directory, and above a ``checkpoints/`` folder. With Accelerate's automatic naming
(``checkpoint_K``) the step is the optimizer's own step count when optimizer.bin records one, else K.
Nothing is guessed: a folder of checkpoints none of which has a step, two checkpoints with one step, or a
--steps spec naming absent steps are errors that name the paths and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptaudit.errors import CorruptFileError, InputNotFoundError, LayoutError
from ckptaudit.io.steps import StepFilter, format_steps, parse_steps  # noqa: F401 - re-exported
from ckptaudit.io.tensors import (
    TensorSource,
    detect_format,
    find_weights,
    is_training_state_file,
    open_tensors,
    safe_torch_load,
)

LAYOUTS = ("hf-trainer", "accelerate", "lightning", "state-dict", "gguf", "dcp", "model-dir", "nanogpt", "deepspeed",
           "peft")

# Layouts whose files need their stack's own reader (a module under ckptaudit/io/ with open_tensors(ckpt) and
# optionally config(ckpt), model_source(source, ckpt, model), optimizer_dict(ckpt), param_shapes(ckpt)).
_STACK_READERS = {"nanogpt": "ckptaudit.io.nanogpt", "lightning": "ckptaudit.io.lightning", "dcp": "ckptaudit.io.dcp",
                  "deepspeed": "ckptaudit.io.deepspeed", "peft": "ckptaudit.io.peft"}


def _remapped(view: Any, pairs: Any) -> Iterator[Any]:
    with view:
        yield from (view.remap(pairs) if hasattr(view, "remap") else pairs)


def stack_reader(layout: str) -> Any:
    """The reader module of a stack layout, or None for the layouts ``open_tensors`` reads directly."""
    name = _STACK_READERS.get(layout)
    if name is None:
        return None
    import importlib

    return importlib.import_module(name)

# Step-bearing names. Directories need one of these; files may also use a trailing integer.
_DIR_STEP_RES = (
    re.compile(r"^(?:checkpoint|ckpt|step|iter|iteration)[-_=]?(\d+)$", re.I),
    re.compile(r"(?:^|[^a-z])step[-_=]?(\d+)(?:$|[^0-9])", re.I),
)
_TRAILING_INT_RE = re.compile(r"(\d+)$")
# A quantisation or precision tag at the end of a file name (model.Q4_1.gguf, model-q8_0, model.f16): never a step.
_QUANT_SUFFIX_RE = re.compile(r"[._-](?:I?Q\d[A-Z0-9_]*|F16|F32|BF16|FP16|FP32)$", re.I)
_LIGHTNING_STEP_RE = re.compile(r"(?:^|[^a-z])step=(\d+)", re.I)
_ACCELERATE_AUTO_RE = re.compile(r"^checkpoint_\d+$")

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
        reader = stack_reader(self.layout)
        if reader is not None:
            return reader.open_tensors(self)
        return open_tensors(self.weights_entry or self.path)

    def model_tensors(self, model: Any) -> TensorSource:
        """The tensors as ``model`` (built from ``config()``) names and lays them out: a stack reader maps its
        stack's names (a Lightning module prefix, nanoGPT's Linear layout...); other layouts are ``tensors()``."""
        reader = stack_reader(self.layout)
        source = self.tensors()
        if reader is not None and hasattr(reader, "model_source"):
            return reader.model_source(source, self, model)
        return source

    def model_stream(self, model: Any, pairs: Any) -> Any:
        """A stream of (stored name, tensor) pairs of this checkpoint's layout (e.g. a predicted theta) mapped as
        ``model_tensors`` maps the stored tensors; the pairs themselves for layouts without a stack reader."""
        if stack_reader(self.layout) is None:
            return pairs
        return _remapped(self.model_tensors(model), pairs)

    def config(self) -> dict | None:
        """The parsed config.json, else the config the stack's own files record (nanoGPT's model_args,
        Lightning's hyper_parameters), or None when the checkpoint has none."""
        if self.config_file:
            return _read_json(self.config_file)
        if self.layout == "gguf":  # its own metadata; a config.json beside it may belong to another model
            from ckptaudit.io.formats import gguf_dims

            return gguf_dims(self.path) or None
        reader = stack_reader(self.layout)
        return reader.config(self) if reader is not None and hasattr(reader, "config") else None

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
    left_out: tuple[tuple[str, str], ...] = ()  # (path, why) of model files found but not part of the trajectory

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return Run(self.path, self.checkpoints[index], self.left_out)
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
        raise LayoutError(f"{self.path}: no checkpoint at step {step}", hint=f"available steps: {format_steps(self.steps)}")


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


def discover_run(path: Path | str, steps: str | None = None, revisions: str | None = None) -> Run:
    """Find the checkpoints of the run at ``path`` (a run directory, one checkpoint folder, or one file), sorted
    by step, optionally filtered by a --steps spec (see ``parse_steps``).

    With ``revisions`` (a glob such as ``step*``), ``path`` is a hub repo id and the run is its cached revisions
    matching the glob (``ckptaudit.io.hub``; byte-identical revisions are left out and listed).

    Raises InputNotFoundError (no such path) or LayoutError (no checkpoints, a step that cannot be determined,
    two checkpoints with the same step, a --steps spec naming absent steps); messages name the paths and the fix.
    """
    if revisions is not None:
        from ckptaudit.io import hub

        def candidate(snapshot: Path, step: int) -> _Candidate | None:
            cand = _dir_candidate(snapshot, run_dir=snapshot, single=True)
            if cand is not None:
                cand.step = step
            return cand

        found, left_out = hub.revision_checkpoints(str(path), revisions, candidate)
        ckpts = _order(found)
        if steps is not None:
            keep = set(parse_steps(steps).select([c.step for c in ckpts]))
            ckpts = [c for c in ckpts if c.step in keep]
        return Run(Path(str(path)), tuple(ckpts), tuple(left_out))
    root = Path(path).expanduser()
    if not root.exists():
        raise InputNotFoundError(f"{root}: no such file or directory", hint="check the run directory path")
    if root.is_file():
        cand = _file_candidate(root, run_dir=root.parent, single=True)
        if cand is None:
            raise LayoutError(f"{root}: not a checkpoint file", hint="pass a weight file or a run directory")
        found, left_out = [cand], []
    else:
        found, left_out = _scan(root, depth=0)
    ckpts = _order(found)
    if steps is not None:
        keep = set(parse_steps(steps).select([c.step for c in ckpts]))
        ckpts = [c for c in ckpts if c.step in keep]
    return Run(root, tuple(ckpts), tuple(left_out))


def _scan(d: Path, depth: int) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """The checkpoints of run directory ``d`` (or ``d`` itself as a run of one), and the model files found
    beside them that are not steps of the trajectory, each with the reason."""
    from ckptaudit.io import deepspeed

    if deepspeed.is_engine_dir(d):
        return [_deepspeed_candidate(d, d.parent, single=True)], []
    children: list[_Candidate] = []
    seen: list[str] = []
    logs: list[Path] = []
    for child in sorted(d.iterdir()):
        if child.name.startswith("."):
            continue
        seen.append(child.name + ("/" if child.is_dir() else ""))
        if child.is_dir():
            if deepspeed.is_engine_dir(child) and not (d / "trainer_state.json").is_file():
                # a DeepSpeed save_dir (SAVE_DIR/global_stepN/); inside a Trainer checkpoint it is that
                # checkpoint's optimizer state instead
                children.append(_deepspeed_candidate(child, d, single=False))
                continue
            if _SKIP_DIR_RE.match(child.name):
                continue
            if child.name == "runs":
                logs.append(child)
                continue
            cand = _dir_candidate(child, run_dir=d, single=False)
        else:
            cand = _file_candidate(child, run_dir=d, single=False)
        if cand is not None:
            children.append(cand)
    self_weights = _weights_or_none(d)
    stepped = [c for c in children if c.step is not None]
    if stepped or (children and self_weights is None):
        unknown = [c for c in children if c.step is None]
        if not stepped:
            raise LayoutError(
                f"{d}: cannot tell the step of {', '.join(c.path.name for c in unknown)}",
                hint="name checkpoints step_N / checkpoint-N (or keep trainer_state.json), move other model "
                "files out of the run directory, or pass one checkpoint directly",
            )
        left_out = [(str(c.path), "no training step in its name or files (a final/best/exported model?); "
                     "pass it directly to audit it alone") for c in unknown]
        if self_weights is not None:
            left_out.append((str(self_weights[0]), "the model saved at the top of the run (trainer.save_model), "
                             "not a step of the trajectory; pass the run's checkpoint-N/ to audit that step"))
        left_out += [(str(p), "training logs (TensorBoard), not a checkpoint") for p in logs]
        return stepped, left_out
    if self_weights is not None or (d / "trainer_state.json").is_file():
        cand = _dir_candidate(d, run_dir=d.parent, single=True)
        if cand is not None:
            # Model files beside the folder's own weights with no step of their own (a GGUF export, say) are
            # other copies of the same model: the folder's full-precision weights are the checkpoint.
            return [cand], [(str(c.path), f"another copy of the model in {d.name}/ ({c.layout}); its own weights "
                             f"({self_weights[0].name if self_weights else 'the folder'}) are read; pass the file "
                             "itself to audit it") for c in children]
    for sub in ("checkpoints", "checkpoint"):  # Lightning, Accelerate automatic naming; torchtitan
        if depth == 0 and (d / sub).is_dir():
            return _scan(d / sub, depth + 1)
    versions = sorted(p for p in (d / "lightning_logs").glob("version_*") if (p / "checkpoints").is_dir())
    if depth == 0 and len(versions) == 1:  # Lightning's default_root_dir with one logged run
        return _scan(versions[0] / "checkpoints", depth + 1)
    if depth == 0 and len(versions) > 1:
        raise LayoutError(f"{d}: several Lightning runs ({', '.join(v.name for v in versions)})",
                          hint=f"pass one of them, e.g. {versions[-1]}")
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
    from ckptaudit.io.peft import adapter_file

    peft_file = adapter_file(d)
    parts_extra: dict[str, Any] = {}
    if entry == d:
        layout = "dcp"
        from ckptaudit.io import dcp

        if dcp.has_subtree(d, "optimizer"):  # get_state_dict(model, optimizer) saved together; torchtitan
            parts_extra = {"optimizer_file": d, "scheduler_file": d if dcp.has_subtree(d, "lr_scheduler") else None}
        else:
            parts_extra = {}
    elif hf:
        layout = "hf-trainer"
    elif any(_ACCELERATE_MARKERS_RE.match(n) for n in names):
        layout = "accelerate"
    else:
        layout = "model-dir"
    parts: dict[str, Any] = {"weight_files": weight_files, "weights_entry": entry,
                             "config_file": _run_config(d, run_dir)}
    if peft_file is not None:  # a LoRA adapter (ckptaudit.io.peft): its config is the base model's
        layout = "peft"
        parts.update(weight_files=(peft_file,), weights_entry=peft_file, config_file=_first_file(d / "config.json"))
        if hf:
            parts["optimizer_file"] = _first_file(d / "optimizer.pt")
            parts["scheduler_file"] = _first_file(d / "scheduler.pt")
            parts["trainer_state_file"] = _first_file(d / "trainer_state.json")
            parts["rng_files"] = tuple(sorted(p for p in d.glob("rng_state*.pth")))
            if parts["trainer_state_file"] is not None:
                state = _read_json(parts["trainer_state_file"])
                if isinstance(state.get("global_step"), int):
                    name_step = state["global_step"]
    step = name_step
    if layout == "dcp":
        parts.update(parts_extra)
    if layout == "hf-trainer":
        from ckptaudit.io.deepspeed import engine_dir_of

        engine = engine_dir_of(d)  # Trainer + DeepSpeed: the engine's global_stepN/ holds optimizer and scheduler
        parts["optimizer_file"] = _first_file(d / "optimizer.pt") or _first_dir(d / "optimizer_0") or engine
        parts["scheduler_file"] = _first_file(d / "scheduler.pt") or engine
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
        if _ACCELERATE_AUTO_RE.match(d.name) and parts["optimizer_file"] is not None:
            # automatic_checkpoint_naming counts saves; the optimizer's own step count is the training step
            step = _optimizer_step(parts["optimizer_file"], default=step)
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
    config = _run_config(run_dir, run_dir)
    if fmt == "safetensors-index":
        return _Candidate(f, "model-dir", _step_from_name(f.parent.name, trailing=False) or 0,
                          {"weight_files": tuple(open_tensors(f).files()), "config_file": _first_file(f.parent / "config.json")})
    if fmt in ("torch-zip", "torch-legacy") and (f.suffix.lower() == ".ckpt" or _LIGHTNING_STEP_RE.search(f.stem)):
        m = _LIGHTNING_STEP_RE.search(f.stem)
        step = int(m.group(1)) if m else _lightning_global_step(f)
        return _Candidate(f, "lightning", step, {"weight_files": (f,), "optimizer_file": f, "scheduler_file": f,
                                                 "config_file": config},
                          alias=f.stem.lower().startswith("last"))
    if fmt == "torch-zip" and f.suffix.lower() in (".pt", ".pth"):
        from ckptaudit.io import nanogpt

        if nanogpt.detect(f):
            return _Candidate(f, "nanogpt", nanogpt.step(f), {
                "weight_files": (f,), "config_file": config,
                "optimizer_file": f if nanogpt.optimizer_dict(f) is not None else None})
    step = _step_from_name(_QUANT_SUFFIX_RE.sub("", f.stem), trailing=True)
    if step is None and single:
        step = 0
    return _Candidate(f, "gguf" if fmt == "gguf" else "state-dict", step,
                      {"weight_files": (f,), "config_file": None if fmt == "gguf" else config})


def _deepspeed_candidate(d: Path, run_dir: Path, single: bool) -> _Candidate:
    """A DeepSpeed engine checkpoint folder (global_stepN/): step from the name, else the recorded global_steps."""
    from ckptaudit.io import deepspeed

    step = _step_from_name(d.name, trailing=False)
    if step is None:
        step = deepspeed.step(d)
    if step is None and single:
        step = 0
    files = tuple(sorted(f for f in d.iterdir() if f.suffix == ".pt"))
    return _Candidate(d, "deepspeed", step, {
        "weight_files": files, "optimizer_file": d, "scheduler_file": d,
        "config_file": _run_config(d, run_dir) or _first_file(run_dir.parent / "config.json")})


def _run_config(d: Path, run_dir: Path) -> Path | None:
    """config.json of the checkpoint folder, else of the run directory, else (for a ``checkpoints/`` folder, as
    Lightning and Accelerate's automatic naming lay runs out) of the project folder above it."""
    above = (run_dir.parent / "config.json",) if run_dir.name in ("checkpoints", "checkpoint") else ()
    return _first_file(d / "config.json", run_dir / "config.json", *above)


def _optimizer_step(path: Path, default: int | None) -> int | None:
    """The number of optimizer steps an optimizer state dict records (the largest per-parameter 'step'), or
    ``default`` when it records none (an optimizer without step counts, or saved before the first step)."""
    from ckptaudit.errors import CkptAuditError

    try:
        sd = safe_torch_load(path)
    except CkptAuditError:
        return default  # the optimizer reader reports a bad file when the state is asked for
    steps = []
    for entry in (sd.get("state") or {}).values() if isinstance(sd, dict) else ():
        value = entry.get("step") if isinstance(entry, dict) else None
        if value is not None:
            try:
                steps.append(int(float(value)))
            except (TypeError, ValueError):
                continue
    return max(steps) if steps else default


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

