"""`fisher` (SPEC section 2): empirical-Fisher Rayleigh quotients along trajectory directions, streaming.

- :mod:`.directions`: the trunk layout (flattening order) and the probe directions.
- :mod:`.store`: the M flattened gradients, in RAM or a disk memmap.
- :mod:`.uncertainty`: standard errors, the exact random-direction expectation, the bootstrap.
- :mod:`.results`: :class:`~.results.FisherCheckpoint` and :class:`~.results.FisherReport`.
- :mod:`.run`: ``fisher_at_model`` (one checkpoint) and ``run_fisher`` (a run), with :class:`~.run.FisherSettings`.
"""
