"""Adapters to frameworks and dashboards, shipped as ``gradguard.integrations``.

Each module imports its framework lazily and raises ``MissingDependencyError`` naming the
extra to install when it is missing.
"""
