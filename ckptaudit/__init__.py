"""ckptaudit: audit neural-network training checkpoints beyond their weights.

The analyses are also Python functions (``ckptaudit.backbone(run)``, ``ckptaudit.resume_probe(ckpt)``, ...; see
:mod:`ckptaudit.api`). They are imported on first use, so ``import ckptaudit`` stays cheap (no torch).
"""

__version__ = "0.1.0"

_API = ("inspect", "backbone", "fisher", "resume_probe", "classify_embeddings", "born_gap", "regimes", "extrapolate",
        "cross_seed", "run_gate", "Report", "EmbeddingsReport")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API or name == "api":
        import importlib

        api = importlib.import_module("ckptaudit.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'ckptaudit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
