"""evalsuite: how good is this frozen representation?

The public entry points are the ``evalsuite`` CLI and the modules named after
what they do: ``checkpoints``, ``trunks``, ``features``, ``cache``, ``results``,
``protocols``, ``registry``, ``data``.
"""

__version__ = "0.1.0"
