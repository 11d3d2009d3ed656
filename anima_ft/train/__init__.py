"""Training: the shared loop (``trainer``), staged schedules (``stages``), param groups, engine and checkpoints,
and ``anima-ft export`` (``export``)."""
