"""Protocol fidelity measurements: one module per task, each exposing ``measure(args) -> dict``, the effect of
every deviation from the published reference that remains as a named option (see each task's Conformance table).
"""
