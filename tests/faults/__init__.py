"""Fault injection: real training loops that go wrong, and what gradguard does about it.

Each module injects one family of faults (NaN/Inf storms, interrupted steps, parameters
that join later, unusual gradients, compiled models, precision limits, floods, bad states,
bad arguments) into small real torch models on the CPU, and asserts what a user would
notice: weights and optimizer state untouched by a skipped step, exact counters, one Event
per episode, or a clear error at construction.
"""
