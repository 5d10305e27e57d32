"""Shared option aliases so every command spells the same idea the same way."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer


def check_output_file(value: Path | None) -> Path | None:
    """Typer callback of output-file options: :func:`check_output_path` before any work is done."""
    return check_output_path(value, "output file")


def check_output_path(value: Path | None, option: str) -> Path | None:
    """Reject, before any work is done, an output file path that cannot be written: an existing directory, a path
    below an existing file, or one whose nearest existing folder is not writable. ``option`` names it in messages."""
    import os

    from ckptaudit.errors import UsageError

    if value is None:
        return value
    value = Path(value)
    if value.is_dir():
        raise UsageError(f"{option} {value}: is a directory, expected a file to write", "give a file name, e.g. out/report.h5")
    parent = value.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{option} {value}: {parent} is a file, so no folder can be made there", "give another path")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {value}: the folder {parent} is not writable", "give a path you can write to")
    if value.exists() and not os.access(value, os.W_OK) and not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {value}: exists and cannot be replaced", "give a path you can write to")
    return value


def check_output_dir(value: Path | None) -> Path | None:
    """Reject an output directory path that is an existing file before any work is done."""
    if value is not None and value.exists() and not value.is_dir():
        from ckptaudit.errors import UsageError

        raise UsageError(f"{value}: is a file, expected a directory for the figures", "give a directory name, e.g. figs/")
    return value


RunDirArg = Annotated[
    Path,
    typer.Argument(help="A run directory (checkpoints ordered by step), a single checkpoint directory, or a checkpoint file."),
]
ModelArg = Annotated[
    str,
    typer.Argument(help="A local model directory, a weight file (safetensors, GGUF...), or a hub id already in the local cache."),
]
CheckpointArg = Annotated[Path, typer.Argument(help="A checkpoint directory or file.")]
def _check_out(value: Path | None) -> Path | None:
    return check_output_path(value, "--out")


OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", callback=_check_out, help="Write the HDF5 report to this file; none is written without --out."),
]
NoReportOpt = Annotated[bool, typer.Option("--no-report", help="Write no HDF5 report even with --out (kept for scripts; no report is the default).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary with stable keys instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors; no progress bars.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where to compute: auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; results are deterministic given it.")]
StepsOpt = Annotated[
    str | None,
    typer.Option(
        "--steps",
        help="Checkpoints to use: a list (100,200), a range START:STOP (inclusive), START:STOP:EVERY, or ::K for every K-th checkpoint.",
    ),
]
RevisionsOpt = Annotated[
    str | None,
    typer.Option(
        "--revisions",
        help="Read RUN as a hub repo id whose cached revisions matching this glob (e.g. 'step*') are the checkpoints, ordered by the number in the revision name.",
    ),
]
NoHashOpt = Annotated[bool, typer.Option("--no-hash", help="Skip the SHA-256 of weight files in the report's /inputs.")]
TaskOpt = Annotated[
    str | None,
    typer.Option("--task", help="Built-in task NAME[:key=value,...] (default: the task in the checkpoint's ckptaudit_task.json)."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Data instead of the task: plain text, JSONL ('text' or 'input_ids'), .npy / JSON token ids, or a "
        "datasets folder / parquet file; text goes through the checkpoint's tokenizer and is cut into --seq-len "
        "windows (next-token loss; the last 10% of windows = validation).",
    ),
]
SeqLenOpt = Annotated[
    int | None,
    typer.Option("--seq-len", min=2, help="Tokens per window of --data (default: the model's context, at most 512)."),
]
PackOpt = Annotated[
    bool,
    typer.Option("--pack", help="Join the documents of --data into one stream before cutting windows (windows may "
                 "then cross document boundaries; default: every document is cut on its own)."),
]
EvalTokensOpt = Annotated[
    int,
    typer.Option("--eval-tokens", min=1, help="Evaluate at most this many tokens of --data's validation windows "
                 "(a seeded selection, recorded in the report)."),
]
TrainTokensOpt = Annotated[
    int | None,
    typer.Option("--train-tokens", min=1, help="Train on at most this many tokens of --data's train windows "
                 "(a seeded selection, recorded in the report; default: all of them)."),
]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="Precision of the model: auto (the checkpoint's dtype on a GPU, float32 on the "
                 "CPU), float32, bfloat16 or float16."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads for torch (torch.set_num_threads; default: torch's own "
                 "choice, OMP_NUM_THREADS when set)."),
]
StrictContextsOpt = Annotated[
    bool,
    typer.Option("--strict", help="Stop at the first unusable context (a target or competitor that is not one token, "
                 "a context longer than the model) instead of skipping it and listing it by file line."),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", callback=check_output_dir, help="Write PNG figures to this directory (needs matplotlib: the plot extra)."),
]
RoleMapOpt = Annotated[
    Path | None,
    typer.Option("--role-map", metavar="FILE",
                 help="Architecture file (TOML/JSON, the schema of the shipped families, see `ckptaudit architectures`): "
                      "a family of its own (name / extends) or rules mapping tensor-name regexes to roles, tried first."),
]
AllowPartialTrunkOpt = Annotated[
    bool,
    typer.Option("--allow-partial-trunk",
                 help="Analyse a trunk that lacks a role its architecture has (e.g. MLP weights no rule places) "
                      "instead of stopping with an error."),
]


def resolve_device(spec: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; anything else is validated and passed through."""
    import torch

    from ckptaudit.errors import UsageError

    spec = spec.strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", spec):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine", "use --device cpu or --device auto")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)", "use cuda:0")
        return spec
    raise UsageError(f"--device {spec}: unknown device", "use auto, cpu, cuda or cuda:N")


def parse_floats(spec: str, option: str, example: str = "1,0.5", positive: bool = False) -> tuple[float, ...]:
    """'1,0.8,0.6' -> (1.0, 0.8, 0.6), in the given order; UsageError naming ``option`` and the bad entry."""
    from ckptaudit.errors import UsageError
    from ckptaudit.io.numbers import parse_float

    values = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        value = parse_float(part, option, hint=f"give comma-separated numbers, e.g. {option} {example}")
        if positive and not value > 0:
            raise UsageError(f"{option}: {part} must be positive", f"e.g. {option} {example}")
        values.append(value)
    if not values:
        raise UsageError(f"{option}: give at least one number", f"e.g. {option} {example}")
    return tuple(values)


def parse_switch(spec: str) -> tuple[int, int]:
    """'PEAK:TROUGH' -> (peak_step, trough_step)."""
    from ckptaudit.errors import UsageError
    from ckptaudit.io.numbers import is_int_text, parse_int

    parts = [p.strip() for p in spec.split(":")]
    if len(parts) != 2 or not all(map(is_int_text, parts)):
        raise UsageError(f"--switch {spec}: expected PEAK:TROUGH as two step numbers", "e.g. --switch 1200:1500")
    return parse_int(parts[0], "--switch"), parse_int(parts[1], "--switch")


def window_spec(seq_len: int | None, pack: bool, eval_tokens: int | None, train_tokens: int | None = None,
                seed: int = 0) -> Any:
    """The tasks.data.WindowSpec of the --seq-len / --pack / --eval-tokens / --train-tokens options."""
    from ckptaudit.tasks.data import WindowSpec

    return WindowSpec(seq_len=seq_len, pack=pack, eval_tokens=eval_tokens, train_tokens=train_tokens, seed=seed)


def apply_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads) when given; returns the thread count torch now uses."""
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())

ProbesOpt = Annotated[
    Path | None,
    typer.Option(
        "--probes",
        help="Probe file, one probe per line (text when the checkpoint has a tokenizer, else token ids). "
        "Default: the package's 100 probe texts (ckptaudit/data/probes.txt) with a tokenizer; the task's own fixed inputs without one.",
    ),
]
ThresholdsOpt = Annotated[
    str | None,
    typer.Option(
        "--thresholds",
        help="Fixed regime thresholds LOW,HIGH on s_t (e.g. 0.997,0.9995). Default: adaptive, the 30th/70th percentiles of s_t.",
    ),
]
