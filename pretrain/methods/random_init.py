"""Random baseline: the seeded initialisation of the trunk, no training (``--seed`` picks the init)."""

from __future__ import annotations

from evalsuite.trunks import build_trunk

from ..base import Method


class RandomInit(Method):
    name = "random"
    description = "random baseline: seeded initialisation, no training"
    trains = False
    n_views = 1
    augment = "center"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self.trunk = build_trunk(arch, seed=self.seed)

    def metadata(self):
        return {**super().metadata(), "init_seed": self.seed}
