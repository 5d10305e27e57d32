"""Analyses: pure computation over lazy tensors, each returning a frozen Result dataclass.

One package (or module) per command:

- :mod:`.backbone` (``backbone``): the streaming Gram engine, the metrics of one Gram matrix, ``run_backbone``.
- :mod:`.fisher` (``fisher``), :mod:`.resume` (``resume-probe``), :mod:`.extrapolate` (``extrapolate``),
  :mod:`.regimes` (``regimes``), :mod:`.gxs` (``gxs transplant|velocity|slack``), :mod:`.embeddings`
  (``classify-embeddings``): packages, one module per part.
- :mod:`.inspect` (``inspect``), :mod:`.born_gap` (``born-gap``), :mod:`.finetune` (``finetune-probe``),
  :mod:`.cross_seed` (``cross-seed``): single modules.
- :mod:`.distributed`: several processes for one analysis (torch.distributed), used by backbone and fisher.

Analyses never print and never parse arguments; the one exception to "never write files" is the optional
streamed vector file of ``run_backbone(save_vectors=...)``, because holding D x k floats in memory to hand to a
writer would break the memory contract.
"""
