"""Task adapters, one module per task, registered under the ``evalsuite.tasks`` entry-point group."""
