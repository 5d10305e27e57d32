"""Checkpoint files in, lazy tensors and run structure out: discovery, tensor sources, optimizer state, roles, models.

Nothing here knows about analyses. Every reader is lazy (one tensor at a time) and never unpickles arbitrary
objects: torch pickles go through ``torch.load(weights_only=True)`` and DCP metadata through a restricted
unpickler.
"""
