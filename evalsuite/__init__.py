"""evalsuite: how good is this frozen representation?

The public entry points are the ``evalsuite`` CLI and the modules named after
what they do: ``checkpoints``, ``trunks``, ``features``, ``cache``, ``results``,
``protocols``, ``registry``, ``data``.
"""

import os

# MKL's "fast" memory manager keeps every GEMM/LAPACK work buffer it ever allocated; the batched SVM solver's
# peak memory grows by ~10 MB with it, for no measured speed-up. Takes effect only when evalsuite is imported
# before torch (the CLI always is); an explicit setting wins.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

__version__ = "0.1.0"
