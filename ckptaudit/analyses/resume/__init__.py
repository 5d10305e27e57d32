"""`resume-probe` (SPEC section 3): from one checkpoint, training resumed under conditions that differ only in
the optimizer state.

- :mod:`.conditions`: a checkpoint turned into a model, its optimizer/scheduler state and its data.
- :mod:`.inputs`: a checkpoint on disk turned into the probe's inputs, so that CONTROL repeats the run.
- :mod:`.trainer`: CONTROL and the other conditions through ``transformers.Trainer``'s own resume.
- :mod:`.run`: the conditions, one training loop, ``run_resume_probe`` and :class:`~.run.ResumeSettings`.
"""
