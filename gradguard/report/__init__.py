"""What gradguard says: the advice catalogue (``advice``), ``guard.summary()`` (``summary``)
and ``guard.report()`` (``text``)."""
