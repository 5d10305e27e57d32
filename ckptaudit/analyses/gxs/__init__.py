"""`gxs` (SPEC section 4, paper 000 sections 3-4): Geometry x Slack.

- :mod:`.evaluation`: evaluation sets and the slack probe.
- :mod:`.run`: Q/K transplants between models and the G/S consolidation velocities.
"""
