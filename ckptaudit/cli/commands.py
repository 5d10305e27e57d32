"""Imports every command module so that each registers itself on the root app.

The import order is the order of `ckptaudit --help` and of the man pages: look first, then analyse, then gate.
"""

# ruff: noqa: F401, I001
from ckptaudit.cli import inspect_cmd
from ckptaudit.cli import architectures_cmd
from ckptaudit.cli import backbone_cmd
from ckptaudit.cli import fisher_cmd
from ckptaudit.cli import resume_probe_cmd
from ckptaudit.cli import gxs_cmd
from ckptaudit.cli import classify_embeddings_cmd
from ckptaudit.cli import born_gap_cmd
from ckptaudit.cli import finetune_probe_cmd
from ckptaudit.cli import regimes_cmd
from ckptaudit.cli import extrapolate_cmd
from ckptaudit.cli import cross_seed_cmd
from ckptaudit.cli import gate_cmd
from ckptaudit.cli import compare_cmd
from ckptaudit.cli import report_cmd
