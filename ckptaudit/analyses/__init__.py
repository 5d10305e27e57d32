"""Analyses: pure computation over lazy tensors, each returning a frozen Result dataclass.

Modules:

- :mod:`ckptaudit.analyses.gram` — the streaming Gram engine shared by trajectory analyses: reads each tensor of
  each checkpoint once, subtracts an anchor, and accumulates the T x T Gram matrix of drift rows in float64
  (on CUDA when asked). Partial Grams over disjoint tensor subsets add, so the work splits across processes.
- :mod:`ckptaudit.analyses.backbone_metrics` — everything SPEC section 1 derives from one Gram matrix: singular
  values, rho_k, k95/k99, backbone coordinate, residual norm, rolling-window and update alignment, sign-flip step,
  switching-direction metrics, velocity and consolidation.
- :mod:`ckptaudit.analyses.backbone` — ``run_backbone``: a run in, a :class:`BackboneReport` out (trunk, blocks,
  role groups G and S, optional streamed singular vectors).

Analyses never print and never parse arguments; the one exception to "never write files" is the optional
streamed vector file of ``run_backbone(save_vectors=...)``, because holding D x k floats in memory to hand to a
writer would break the memory contract.
"""
