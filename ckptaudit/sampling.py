"""Seeded, stateless batch order shared by the built-in tasks and file data.

Examples are drawn epoch by epoch without replacement: global position ``i = step * batch_size + j`` falls in
epoch ``i // n`` and takes element ``i % n`` of that epoch's seeded permutation, so every example is seen once per
epoch and any step's batch can be rebuilt without replaying the earlier ones.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts``; stable across processes (unlike ``hash()``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_sample(n: int, step: int, batch_size: int, *key: object) -> torch.Tensor:
    """Indices into ``range(n)`` (int64 ``[batch_size]``) of batch ``step``; epoch e is permuted with the seed
    ``stable_seed(*key, e)``."""
    if step < 0 or batch_size < 1:
        raise ValueError(f"need step >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
    positions = torch.arange(step * batch_size, (step + 1) * batch_size, dtype=torch.long)
    epochs = torch.div(positions, n, rounding_mode="floor")
    chosen = torch.empty(batch_size, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(*key, epoch)))
        mask = epochs == epoch
        chosen[mask] = perm[positions[mask] % n]
    return chosen
