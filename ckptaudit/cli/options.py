"""Shared option aliases so every command spells the same idea the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunDirArg = Annotated[
    Path,
    typer.Argument(help="A run directory (checkpoints ordered by step), a single checkpoint directory, or a checkpoint file."),
]
CheckpointArg = Annotated[Path, typer.Argument(help="A checkpoint directory or file.")]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="HDF5 report to write (default: ckptaudit-<command>-<UTC time>.h5)."),
]
NoReportOpt = Annotated[bool, typer.Option("--no-report", help="Do not write an HDF5 report.")]
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
NoHashOpt = Annotated[bool, typer.Option("--no-hash", help="Skip the SHA-256 of weight files in the report's /inputs.")]
RoleMapOpt = Annotated[
    Path | None,
    typer.Option("--role-map", help="TOML/JSON file mapping tensor-name regexes to roles, for architectures ckptaudit does not know."),
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
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine", "use --device cpu or --device auto")
        return spec
    raise UsageError(f"--device {spec}: unknown device", "use auto, cpu, cuda or cuda:N")
