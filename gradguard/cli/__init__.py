"""The ``gradguard`` command line and its demo."""
