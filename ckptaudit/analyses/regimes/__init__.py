"""`regimes` (SPEC section 7, paper 004 sections 2.2-2.3): training regimes from activation fingerprints.

- :mod:`.signals`: the detector's other signals and the sampling uncertainty of s_t.
- :mod:`.run`: probe sets, fingerprints, thresholds and ``run_regimes``.
"""
