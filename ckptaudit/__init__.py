"""ckptaudit: audit neural-network training checkpoints beyond their weights."""

__version__ = "0.1.0"
