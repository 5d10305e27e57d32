"""`extrapolate` (SPEC section 7, paper 004): speculative weight prediction and its acceptance.

- :mod:`.predictors`: the predictors (linear, quadratic, quadratic-fit, momentum, adam-step), streamed per tensor.
- :mod:`.stats`: the K-consecutive-stable gate and the uncertainty of acceptance rates.
- :mod:`.landscape`: the loss along each prediction direction (``--landscape``).
- :mod:`.moments`: Adam's moments stored at a lower precision (``--moment-dtype``).
- :mod:`.run`: the analysis over a run (every predictor at every K, cascades, timing).
"""
