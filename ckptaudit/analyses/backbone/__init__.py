"""`backbone` (SPEC section 1): the uncentered drift-matrix SVD of a run, through one streaming Gram pass.

- :mod:`.gram`: the streaming Gram engine (the T x T Gram of drift rows over every stored tensor, in chunks);
  :mod:`.chunks`: one chunk of its pass (read, drift rows, products, threads).
- :mod:`.metrics`: everything derived from one Gram matrix (spectrum, k95, a(t), c(w), C(t), switches, velocity).
- :mod:`.dynamics`: trajectory dynamics around the backbone (rotations, speeds, power laws).
- :mod:`.run`: ``run_backbone``, a run in and a :class:`~.run.BackboneReport` out, and the streamed vectors.
"""
