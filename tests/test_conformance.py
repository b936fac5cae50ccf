"""The conformance table: generated from the presets (docs/protocols.md cannot drift), every goyal19 field has
an entry, and a record names the fields where its protocol leaves the published one."""

from __future__ import annotations

from dataclasses import dataclass

from evalsuite import conformance
from evalsuite.protocols import TaskProtocol


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


def test_the_protocols_page_is_generated_from_the_code() -> None:
    assert conformance.main(["--check"]) == 0, "run python -m evalsuite.conformance"


def test_every_goyal19_field_of_every_task_with_a_table_has_an_entry() -> None:
    rows = conformance.rows()
    tables = {r.task for r in rows if r.status != conformance.MISSING}
    missing = [f"{r.task}.{r.field}" for r in rows if r.task in tables and r.status == conformance.MISSING]
    assert tables and not missing, missing
