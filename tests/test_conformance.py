"""The conformance table: generated from the presets (docs/protocols.md cannot drift), every goyal19 field has
an entry, and a record names the fields where its protocol leaves the published one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from evalsuite import conformance
from evalsuite.errors import UserError
from evalsuite.protocols import TaskProtocol, preset_changes


@dataclass(frozen=True)
class ToyProtocol(TaskProtocol):
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 64
    image_size: int = 224


class ToyTask:
    name = "toy"
    conformance = {"k": ("20", "dino:eval_knn.py", "same"),
                   "temperature": ("0.07", "dino:eval_knn.py", "same"),
                   "batch_size": ("", "", "ours: extraction batch, no effect on the number"),
                   "image_size": ("224", "dino:eval_knn.py", "deviation: 0.3 points (measured)")}

    def default_protocol(self, preset: str) -> ToyProtocol:
        return ToyProtocol()


def test_deviations_are_our_known_deviations_and_fields_set_away_from_the_reference() -> None:
    task = ToyTask()
    assert conformance.deviations(task, ToyProtocol()) == ["image_size"]
    assert conformance.deviations(task, ToyProtocol(k=200, batch_size=8)) == ["k", "image_size"]


class ToyDinoTask(ToyTask):
    """A task with a dino21 reference of its own, whose reference also runs k=10 with T=0.1 (a variant)."""

    preset_conformance = {"dino21": {"k": ("20", "dino:eval_knn.py", "same"),
                                     "temperature": ("0.07", "dino:eval_knn.py", "same"),
                                     "batch_size": ("", "", "ours: no effect"),
                                     "image_size": ("224", "dino:eval_knn.py", "same")}}
    reference_variants = {"dino21": ({"k": 10, "temperature": 0.1},)}

    def default_protocol(self, preset: str) -> ToyProtocol:
        return ToyProtocol(**preset_changes({"goyal19": {}, "dino21": {"batch_size": 32}, "quick": {}}, preset,
                                            "toy"))


def test_a_preset_with_its_own_reference_is_held_against_it() -> None:
    task = ToyDinoTask()
    assert conformance.deviations(task, ToyProtocol(batch_size=32), "dino21") == []  # no goyal19 image_size deviation
    assert conformance.deviations(task, ToyProtocol(k=10, temperature=0.1), "dino21") == []  # the reference variant
    assert conformance.deviations(task, ToyProtocol(k=10), "dino21") == ["k"]
    assert conformance.deviations(task, ToyProtocol(image_size=32), "dino21") == ["image_size"]
    # quick has no reference of its own: goyal19's table, as before
    assert conformance.deviations(task, ToyProtocol(), "quick") == ["image_size"]
    assert conformance.reference_preset(task, "quick") == "goyal19"
    assert conformance.reference_preset(task, "dino21") == "dino21"
    with pytest.raises(UserError, match=r"^toy has no vissl protocol \(VISSL's variants of the same benchmarks\); "
                                        r"its presets: goyal19, dino21, quick$"):
        task.default_protocol("vissl")
    with pytest.raises(UserError, match="unknown protocol preset 'dino'"):
        task.default_protocol("dino")


def test_every_dino21_field_of_every_task_with_a_dino21_table_has_an_entry() -> None:
    rows = conformance.rows(preset="dino21")
    assert {r.task for r in rows} == {"knn", "places205_linear", "imagenet_linear"}
    missing = [f"{r.task}.{r.field}" for r in rows if r.status == conformance.MISSING]
    assert not missing, missing
    assert all(r.status == "same" for r in rows if r.field in ("k", "temperature", "epochs", "lr", "lr_schedule"))


def test_the_protocols_page_is_generated_from_the_code() -> None:
    assert conformance.main(["--check"]) == 0, "run python -m evalsuite.conformance"


def test_every_goyal19_field_of_every_task_with_a_table_has_an_entry() -> None:
    rows = conformance.rows()
    tables = {r.task for r in rows if r.status != conformance.MISSING}
    missing = [f"{r.task}.{r.field}" for r in rows if r.task in tables and r.status == conformance.MISSING]
    assert tables and not missing, missing
