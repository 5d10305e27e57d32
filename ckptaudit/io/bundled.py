"""Files shipped inside the package (``ckptaudit/data/``), so that an installed ckptaudit finds them wherever it runs.

- ``probes.txt``: the 100 default probe texts of ``regimes`` / ``extrapolate`` / ``cross-seed`` (arithmetic,
  linguistic, factual, random tokens).
- ``near_synonyms.jsonl``: ten near-synonym contexts of paper 002 whose targets and competitors are single tokens
  for SmolLM2's tokenizer; ``--contexts near-synonyms`` names it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_PROBES = "probes.txt"
# --contexts NAME -> the bundled file it names
BUNDLED_CONTEXTS = {"near-synonyms": "near_synonyms.jsonl"}


def bundled_file(name: str) -> Path:
    """The path of a file under ``ckptaudit/data/`` of the installed package."""
    return Path(str(resources.files("ckptaudit") / "data" / name))


def contexts_file(spec: str | Path) -> Path:
    """A --contexts value as a path: the file itself when it exists, else the bundled file of that name
    (``near-synonyms``); a path that is neither is returned as given (the reader reports it missing)."""
    path = Path(spec)
    if not path.exists() and str(spec) in BUNDLED_CONTEXTS:
        return bundled_file(BUNDLED_CONTEXTS[str(spec)])
    return path
