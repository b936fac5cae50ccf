"""Leaderboard: aggregation rules, the static site's content, escaping, bad input, package references."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import stat
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from evalsuite.cli import main
from evalsuite.errors import UserError
from evalsuite.results import Result, append_results
from leaderboard.aggregate import best_layer, deduplicate, load_results, lower_is_better
from leaderboard.references import load_references, reference_files, variant_of
from leaderboard.site import MARKER, build_site, slug

LAYERS = ["conv1", "res2", "res3", "res4", "res5"]


def rec(value, *, task="voc07_svm", layer="res5", metric="mAP", ck="a", method="supervised", protocol="goyal19",
        created="2024-01-01T00:00:00Z", params=None, seed=0, dataset="voc2007", split="test", **kw) -> Result:
    checkpoint = {"checkpoint_id": ck * 64, "checkpoint": f"/ckpts/{method}.pth", "arch": "resnet50",
                  "pretrain_data": "imagenet1k"}
    return Result(task=task, dataset=dataset, split=split, layer=layer, metric=metric, value=value, method=method,
                  protocol=protocol, params=params if params is not None else {"cost": 1}, seed=seed,
                  created=created, **{**checkpoint, **kw})


def lines_with(records, **fields) -> str:
    """JSONL of ``records`` with extra record fields (as newer writers add them; older records lack them)."""
    return "".join(json.dumps({**json.loads(r.to_json()), **fields}) + "\n" for r in records)


def write(directory: Path, records: list[Result]) -> Path:
    """Append records to DIRECTORY/results.jsonl (the layout `evalsuite run --out` writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    return append_results(directory / "results.jsonl", records)


class Tables(HTMLParser):
    """Collect every table as a list of rows of cell texts, keyed by the table's id (or its index)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts: list[dict] = []
        self._stack: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
        if tag == "br" and self._cell is not None:
            self._cell.append(" ")
        if tag == "table":
            name = a.get("id") or f"table{len(self.tables)}"
            self.tables[name] = []
            self._stack.append(name)
        elif tag == "tr" and self._stack:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table" and self._stack:
            self._stack.pop()
        elif tag == "tr" and self._row is not None:
            self.tables[self._stack[-1]].append(self._row)
            self._row = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Tables:
    p = Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


class Inline(HTMLParser):
    """Every <a> and <span>: its attributes and its text."""

    def __init__(self):
        super().__init__()
        self.found: list[dict[str, str]] = []
        self._open: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("a", "span"):
            e = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
            self.found.append(e)
            self._open.append(e)

    def handle_endtag(self, tag):
        if tag in ("a", "span") and self._open:
            self._open.pop()

    def handle_data(self, data):
        for e in self._open:
            e["text"] += data


def inline(path: Path, cls: str | None = None) -> list[dict[str, str]]:
    p = Inline()
    p.feed(path.read_text(encoding="utf-8"))
    return [e for e in p.found if cls is None or cls in e.get("class", "").split()]


# ---------------------------------------------------------------- aggregation

def test_latest_wins_ties_go_to_the_later_record_and_conflicts_are_flagged(tmp_path) -> None:
    write(tmp_path / "a", [rec(50.0, created="2024-01-01T00:00:00Z", params={"cost": 1}),
                                    rec(70.0, created="2024-03-01T00:00:00Z", params={"cost": 10})])
    # a second file read later: same stamp as the newest one, so file order decides
    write(tmp_path / "b", [rec(71.0, created="2024-03-01T00:00:00Z", params={"cost": 10}),
                                    rec(10.0, created="2023-12-31T00:00:00Z", params={"cost": 1})])
    raw = load_results([tmp_path / "a", tmp_path / "b"])
    assert len(raw) == 4
    agg = deduplicate(raw, "latest")
    assert len(agg) == 1
    row = agg.iloc[0]
    assert row["value"] == 71.0 and row["n_runs"] == 4 and bool(row["params_conflict"])
    assert row["source_file"].endswith("b/results.jsonl")


def test_mean_over_seeds_uses_only_the_latest_protocol_and_latest_record_per_seed(tmp_path) -> None:
    p = {"cost": 10}
    write(tmp_path, [
        rec(1000.0, seed=0, params={"cost": 1}, created="2024-01-01T00:00:00Z"),  # other protocol: excluded
        rec(99.0, seed=1, params=p, created="2024-01-02T00:00:00Z"),  # superseded re-run of seed 1
        rec(10.0, seed=0, params=p, created="2024-01-03T00:00:00Z"),
        rec(20.0, seed=1, params=p, created="2024-01-04T00:00:00Z"),
        rec(30.0, seed=2, params=p, created="2024-01-05T00:00:00Z"),
    ])
    agg = deduplicate(load_results([tmp_path]), "mean")
    row = agg.iloc[0]
    assert row["value"] == pytest.approx(statistics.mean([10, 20, 30]))
    assert row["std"] == pytest.approx(statistics.stdev([10, 20, 30]))
    assert row["n_seeds"] == 3 and row["n_runs"] == 5
    latest = deduplicate(load_results([tmp_path]), "latest").iloc[0]
    assert latest["value"] == 30.0 and latest["n_seeds"] == 1


def test_distinct_keys_are_not_merged(tmp_path) -> None:
    rs = [rec(1.0, layer="res4"), rec(2.0, layer="res5"), rec(3.0, split="val"), rec(4.0, protocol="quick"),
          rec(5.0, ck="b"), rec(6.0, task="lowshot_svm", params={"k": 1}), rec(7.0, task="lowshot_svm",
                                                                               params={"k": 2})]
    write(tmp_path, rs)
    agg = deduplicate(load_results([tmp_path]))
    assert sorted(agg["value"]) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert set(agg.loc[agg["task"] == "lowshot_svm", "variant"]) == {"k=1", "k=2"}


def test_best_layer_respects_metric_direction(tmp_path) -> None:
    acc = {"conv1": 20.0, "res2": 40.0, "res3": 65.0, "res4": 61.0, "res5": 50.0}
    err = {"res3": 30.0, "res4": 19.5, "res5": 22.0}
    rs = [rec(v, task="places205_linear", metric="top1", layer=lay) for lay, v in acc.items()]
    rs += [rec(v, task="surface_normals", metric="median_angle_error_deg", layer=lay) for lay, v in err.items()]
    write(tmp_path, rs)
    best = best_layer(deduplicate(load_results([tmp_path]))).set_index("task")
    assert best.loc["places205_linear", "layer"] == "res3" and best.loc["places205_linear", "value"] == 65.0
    assert best.loc["surface_normals", "layer"] == "res4" and best.loc["surface_normals", "value"] == 19.5
    assert lower_is_better("median_angle_error_deg") and not lower_is_better("pct_within_11.25deg")


# ---------------------------------------------------------------- site

def _two_checkpoints(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    sup = {"conv1": 24.0, "res2": 47.5, "res3": 60.25, "res4": 80.0, "res5": 88.5}
    jig = {"conv1": 28.0, "res2": 39.0, "res3": 55.0, "res4": 67.75, "res5": 55.0}
    rs = [rec(v, layer=lay, params={"costs": [1, 10, 100], "folds": 3}) for lay, v in sup.items()]
    rs += [rec(v, layer=lay, ck="b", method="jigsaw") for lay, v in jig.items()]
    rs += [rec(41.5, task="places205_linear", metric="top1", layer="res4", params={"lr": 0.01})]  # jigsaw: missing
    write(runs, rs)
    return runs


def test_site_overview_task_and_checkpoint_pages_hold_the_numbers(tmp_path) -> None:
    runs = _two_checkpoints(tmp_path)
    rep = build_site([runs], tmp_path / "site")
    site = tmp_path / "site"
    assert rep.n_records == 11 and rep.n_checkpoints == 2 and rep.tasks == ["places205_linear", "voc07_svm"]
    ov = parse(site / "index.html").tables["overview-table"]
    header, body = ov[0], ov[1:]
    assert header[:2] == ["checkpoint", "protocol"]
    pl, voc = header.index("places205_linear top1"), header.index("voc07_svm mAP")
    rows = {r[0]: r for r in body}
    assert set(rows) == {"supervised / resnet50 / imagenet1k", "jigsaw / resnet50 / imagenet1k"}
    assert rows["supervised / resnet50 / imagenet1k"][voc] == "88.50 res5"
    assert rows["jigsaw / resnet50 / imagenet1k"][voc] == "67.75 res4"  # best layer is not the last one
    assert rows["supervised / resnet50 / imagenet1k"][pl] == "41.50 res4"
    assert rows["jigsaw / resnet50 / imagenet1k"][pl] == "–"  # missing task
    # published numbers beside ours, marked
    pub = parse(site / "index.html").tables["published-table"]
    goyal_sup = [r for r in pub if r[2].startswith("supervised / resnet50 / imagenet1k") and r[0] == "voc07_svm"
                 and r[5].startswith("goyal19")]
    assert goyal_sup and goyal_sup[0][3] == "87.95" and "published" in goyal_sup[0][2]
    # task page: per-layer table, plot, published per-layer rows (Goyal's ImageNet-supervised VOC07 row)
    task_html = next((site / "tasks").glob("voc07-svm-*.html"))
    t = parse(task_html).tables
    per_layer = t["table0"]
    assert per_layer[0][2:7] == ["conv1", "res2", "res3", "res4", "res5"]
    sup_row = next(r for r in per_layer if r[0].startswith("supervised"))
    assert sup_row[2:7] == ["24.00", "47.50", "60.25", "80.00", "88.50"]
    published = t["table1"]
    goyal = next(r for r in published if r[0] == "supervised / resnet50 / imagenet1k" and "goyal19" in r[-2])
    assert goyal[1:6] == ["24.49", "47.75", "60.54", "80.36", "87.95"]
    text = html.unescape(task_html.read_text())
    assert "../plots/" in text and '"folds": 3' in text
    svgs = list((site / "plots").glob("*.svg"))
    assert svgs and all(s.read_text().lstrip().startswith("<?xml") for s in svgs)
    # checkpoint page: every number with its full protocol
    assert len(list((site / "checkpoints").glob("*.html"))) == 2
    sup_page = next(p for p in (site / "checkpoints").glob("*.html") if "supervised" in p.read_text())
    sup_text = html.unescape(sup_page.read_text())
    assert '"costs": [' in sup_text and '"lr": 0.01' in sup_text
    # exports
    import pandas as pd

    csv = pd.read_csv(site / "leaderboard.csv")
    assert len(csv) == 11 and set(csv["task"]) == {"voc07_svm", "places205_linear"}
    md = (site / "leaderboard.md").read_text()
    assert "| supervised / resnet50 / imagenet1k | goyal19 | 41.50 (res4) | 88.50 (res5) |" in md
    assert (site / MARKER).exists() and (site / "references_used.csv").exists()


def test_protocol_mismatch_with_published_rows_is_flagged(tmp_path) -> None:
    runs = tmp_path / "runs"
    write(runs, [rec(30.0 + i, layer=lay, protocol="quick") for i, lay in enumerate(LAYERS)])
    build_site([runs], tmp_path / "site")
    page = next((tmp_path / "site" / "tasks").glob("voc07-svm-*.html")).read_text()
    assert "protocol ≠ ours" in page


def test_hostile_names_cannot_inject_markup(tmp_path) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>$\\frac{a}{b}$'
    runs = tmp_path / "runs"
    r = [rec(10.0 + i, layer=lay, method=evil, params={"note": evil}) for i, lay in enumerate(LAYERS)]
    for x in r:
        x.checkpoint, x.pretrain_data, x.note = evil, evil, evil
    write(runs, r)
    build_site([runs], tmp_path / "site")
    site = tmp_path / "site"
    pages = [site / "index.html", *site.glob("tasks/*.html"), *site.glob("checkpoints/*.html")]
    for page in pages:
        text = page.read_text()
        assert "<script>alert" not in text and "<img src=x" not in text, page
        scripts = parse(page).scripts
        assert [s.get("src", "").rsplit("/", 1)[-1] for s in scripts] == ["sort.js"], page
    assert "&lt;script&gt;" in (site / "index.html").read_text()
    for svg in site.glob("plots/*.svg"):
        assert "<script" not in svg.read_text()
    md = (site / "leaderboard.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md


# ---------------------------------------------------------------- bad input, atomic output

def test_corrupt_results_file_is_one_clear_error_and_leaves_the_old_site(tmp_path, capsys) -> None:
    runs = _two_checkpoints(tmp_path)
    out = tmp_path / "site"
    assert main(["leaderboard", "build", "--results", str(runs), "--out", str(out), "--no-plots"]) == 0
    before = (out / "index.html").read_text()
    bad = tmp_path / "bad" / "results.jsonl"
    bad.parent.mkdir()
    bad.write_text(rec(1.0).to_json() + "\n{not json\n")
    capsys.readouterr()
    assert main(["leaderboard", "build", "--results", str(runs), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "line 2" in err[0]
    assert (out / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "runs", "site"]  # no temp dirs left behind
    # nothing at all when there was no previous site
    assert main(["leaderboard", "build", "--results", str(bad), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("line,message", [
    ('{"task": "t", "dataset": "d", "split": "s", "layer": "l", "metric": "m", "value": "high"}', "value"),
    ('{"task": "t", "dataset": "d", "split": "s", "layer": "", "metric": "m", "value": 1}', "layer"),
    ('{"task": "t", "layer": "l", "metric": "m", "value": 1, "params": [1]}', "params"),
])
def test_invalid_records_name_the_file(tmp_path, line, message) -> None:
    f = tmp_path / "results.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(UserError, match=message) as e:
        load_results([f])
    assert e.value.path == str(f)


def test_refuses_to_replace_a_directory_that_is_not_a_site(tmp_path) -> None:
    runs = _two_checkpoints(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(UserError, match="refusing"):
        build_site([runs], out)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_site_folder_keeps_the_umask_or_its_own_permissions(tmp_path) -> None:
    runs = _two_checkpoints(tmp_path)
    umask = os.umask(0o027)  # a group-readable umask, so the expected mode differs from mkdtemp's 0700
    try:
        build_site([runs], tmp_path / "new", plots=False)
        existing = tmp_path / "existing"
        existing.mkdir()
        existing.chmod(0o755)
        build_site([runs], existing, plots=False)
        assert stat.S_IMODE(existing.stat().st_mode) == 0o755
        build_site([runs], existing, plots=False)  # rebuilding a previous site keeps its mode too
        assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~0o027 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "new", "runs"]  # no temporaries left


# ---------------------------------------------------------------- references

def test_a_per_dataset_published_number_is_shown_with_its_dataset_only(tmp_path) -> None:
    """linear_transfer runs several datasets; Ericsson et al.'s numbers name theirs (ericsson21_transfer.csv): each
    dataset's section of the task page lists that dataset's published number (DeepCluster-v2: CIFAR10 94.02, Cars
    58.60), never another dataset's."""
    runs = tmp_path / "runs"
    write(runs, [rec(93.9, task="linear_transfer", metric="top1", method="deepcluster_v2", protocol="ericsson21",
                     dataset=ds) for ds in ("cifar10", "stanford_cars")])
    build_site([runs], tmp_path / "site", plots=False, tie_resamples=0)
    tables = parse(tmp_path / "site" / "tasks" / f"{slug('linear_transfer')}.html").tables
    published = [t for t in tables.values() if t and t[0][0] == "method / arch / data"]
    assert len(published) == 2  # one section per dataset, in dataset order: cifar10, stanford_cars
    values = [{r[0].split()[0]: r[1] for r in t[1:]} for t in published]
    assert values[0]["deepcluster_v2"] == "94.02" and values[1]["deepcluster_v2"] == "58.60"
    assert all(len(t) == 1 + 14 for t in published)  # the 14 models of Table 1, once each


def test_package_references_match_the_sha256_in_their_provenance() -> None:
    """Each CSV still has the sha256 recorded when it was copied (the list in references/PROVENANCE.md).

    The list must name exactly the CSVs the package loads, once each: a CSV edited, added or removed
    without updating PROVENANCE.md fails here. Nothing outside the repository is read.
    """
    pkg = Path(__file__).resolve().parents[1] / "leaderboard" / "references"
    listed = re.findall(r"^([0-9a-f]{64})  (\S+\.csv)$", (pkg / "PROVENANCE.md").read_text(), flags=re.M)
    recorded = {name: digest for digest, name in listed}
    names = reference_files()
    assert names == sorted(p.name for p in pkg.glob("*.csv"))
    assert len(names) == 14
    assert len(recorded) == len(listed), "a CSV is listed twice in PROVENANCE.md"
    assert sorted(recorded) == names
    for n in names:
        assert hashlib.sha256((pkg / n).read_bytes()).hexdigest() == recorded[n], n


def test_reference_table_columns_and_parsing() -> None:
    refs = load_references()
    # 803 from the shared extraction + 46 ViT rows (vit_imagenet.csv) + 70 semi-supervised + 56 solo-learn CIFAR
    # + 336 Ericsson et al. 2021 transfer rows
    assert len(refs) == 1311
    assert variant_of("mmselfsup: VOC07 low-shot SVM, k=16, config=x, best layer=feature5") == "k=16"
    assert variant_of("mmselfsup: VOC07 linear SVM on full trainval, k=all, config=x") == ""
    assert variant_of("simclrv2_20: fine-tuned, labels=10%, top-1") == "labels=10%"
    semi = refs[(refs["suite_task"] == "semi_supervised") & (refs["file"] != "other.csv")]
    assert {"labels=1%", "labels=10%"} <= set(semi["variant"]) and "" not in set(semi["variant"])
    low = refs[refs["file"] == "lowshot.csv"]
    assert set(low["suite_task"]) == {"voc07_svm", "lowshot_svm"}
    assert set(low.loc[low["suite_task"] == "lowshot_svm", "variant"]) == {f"k={k}" for k in (1, 2, 4, 8, 16, 32,
                                                                                                64, 96)}
    goyal = refs[(refs["file"] == "voc07_svm.csv") & (refs["method"] == "supervised")].set_index("layer")
    assert goyal.loc["res5", "value"] == "87.95" and goyal.loc["res5", "source_key"] == "goyal19"
    assert refs.loc[refs["task"] == "nyuv2_surface_normals", "suite_task"].eq("surface_normals").all()
    assert json.loads(json.dumps(list(refs.columns)))  # plain column names


# ---------------------------------------------------------------- checkpoint names, partial loads, bad lines

def test_partial_load_is_marked_with_its_missing_key_count(tmp_path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    full = {"weights": "state_dict", "partial": False, "missing": 0, "missing_keys": []}
    part = {"weights": "state_dict[backbone.]", "partial": True, "missing": 2,
            "missing_keys": ["layer4.1.bn2.weight", "layer4.1.bn2.bias"]}
    text = lines_with([rec(80.0 + i, layer=lay) for i, lay in enumerate(LAYERS)], checkpoint_load=full)
    text += lines_with([rec(60.0 + i, layer=lay, ck="b", method="jigsaw") for i, lay in enumerate(LAYERS)],
                       checkpoint_load=part)
    text += lines_with([rec(50.0, ck="c", method="rotnet")])  # an old record without checkpoint_load
    (runs / "results.jsonl").write_text(text)
    site = tmp_path / "site"
    build_site([runs], site)
    rows = {r[0]: r for r in parse(site / "index.html").tables["overview-table"][1:]}
    assert set(rows) == {"supervised / resnet50 / imagenet1k", "jigsaw / resnet50 / imagenet1k partial",
                         "rotnet / resnet50 / imagenet1k"}
    jigsaw_page = site / "checkpoints" / f"{slug('b' * 64)}.html"
    task_page = next((site / "tasks").glob("voc07-svm-*.html"))
    for page in (site / "index.html", task_page, jigsaw_page):
        marks = inline(page, "partial")
        assert marks, page
        assert all(m["text"].strip() == "partial" and "2 missing keys" in m["title"] for m in marks), marks
    assert not inline(site / "checkpoints" / f"{slug('a' * 64)}.html", "partial")
    assert not inline(site / "checkpoints" / f"{slug('c' * 64)}.html", "partial")
    # the checkpoint page names the keys left at random init
    assert "layer4.1.bn2.bias" in jigsaw_page.read_text() and "layer4.1.bn2.weight" in jigsaw_page.read_text()


def test_foreign_checkpoints_are_told_apart_with_path_and_sha256_on_hover(tmp_path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    foreign = {"method": "unknown", "arch": "resnet18", "pretrain_data": "unknown"}
    paths = {"a": "/models/run1/moco_800ep.pth.tar", "b": "/models/run2/checkpoint.pth",
             "c": "/models/run3/checkpoint.pth", "d": "/models/run4/checkpoint.pth",
             "e": "/ckpts/sup_90ep.pth", "f": "/ckpts/sup_300ep.pth"}
    # an old record: no checkpoint_name, so the file name without its suffixes
    text = lines_with([rec(10.0, ck="a", checkpoint=paths["a"], **foreign)])
    text += lines_with([rec(11.0, ck="b", checkpoint=paths["b"], **foreign)], checkpoint_name="byol-long")
    # same name twice: the short sha256 tells them apart
    text += lines_with([rec(12.0, ck="c", checkpoint=paths["c"], **foreign)], checkpoint_name="checkpoint")
    text += lines_with([rec(13.0, ck="d", checkpoint=paths["d"], **foreign)], checkpoint_name="checkpoint")
    # known method/arch/data twice: the names tell them apart
    text += lines_with([rec(14.0, ck="e", checkpoint=paths["e"])], checkpoint_name="sup_90ep")
    text += lines_with([rec(15.0, ck="f", checkpoint=paths["f"])], checkpoint_name="sup_300ep")
    (runs / "results.jsonl").write_text(text)
    site = tmp_path / "site"
    build_site([runs], site)
    expected = {"a": "moco_800ep / resnet18", "b": "byol-long / resnet18",
                "c": "checkpoint / resnet18 (" + "c" * 8 + ")", "d": "checkpoint / resnet18 (" + "d" * 8 + ")",
                "e": "supervised / resnet50 / imagenet1k (sup_90ep)",
                "f": "supervised / resnet50 / imagenet1k (sup_300ep)"}
    rows = parse(site / "index.html").tables["overview-table"][1:]
    assert sorted(r[0] for r in rows) == sorted(expected.values())
    links = {e["text"]: e for e in inline(site / "index.html") if e.get("href", "").startswith("checkpoints/")}
    for ck, label in expected.items():
        assert links[label]["href"] == f"checkpoints/{slug(ck * 64)}.html"
        assert links[label]["title"] == f"{paths[ck]}\nsha256 {ck * 64}"
        page = site / "checkpoints" / f"{slug(ck * 64)}.html"
        meta = {r[0]: r[1] for r in parse(page).tables["table0"]}
        assert meta["checkpoint"] == paths[ck] and meta["id (sha256)"] == ck * 64
        assert meta["name"] == label.split(" / ")[0] if ck in "abcd" else label.split("(")[1].rstrip(")")
    task_links = [e for e in inline(next((site / "tasks").glob("voc07-svm-*.html")))
                  if e.get("href", "").startswith("../checkpoints/")]
    assert {e["title"] for e in task_links} == {f"{paths[ck]}\nsha256 {ck * 64}" for ck in expected}


def test_build_skip_bad_lines_counts_and_reports_them(tmp_path, capsys) -> None:
    runs = _two_checkpoints(tmp_path)
    f = runs / "results.jsonl"
    lines = f.read_text().splitlines()
    assert len(lines) == 11
    lines.insert(6, '{"task": "voc07_svm", "layer": "res')  # line 7: cut off by a crash
    lines.insert(9, "[1, 2]")  # line 10: JSON, but not a record
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "site"
    assert main(["leaderboard", "build", "--results", str(runs), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and "line 7" in err[0] and "--skip-bad-lines" in err[0]
    assert not out.exists()
    assert main(["leaderboard", "build", "--results", str(runs), "--out", str(out), "--no-plots",
                 "--skip-bad-lines"]) == 0
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [f"evalsuite: warning: skipped 2 unreadable lines in {f} (first at line 7)"]
    assert cap.out.startswith("11 records -> 11 numbers")
    import pandas as pd

    assert len(pd.read_csv(out / "leaderboard.csv")) == 11


@pytest.mark.parametrize("spec", ["/models/moco_v2_800ep.pth.tar", "/m/ckpt_ep0.5.pth", "swav.PTH", "w.safetensors",
                                  "random:resnet18", "torchvision:resnet50", "notes.txt", ".pth"])
def test_old_records_get_the_name_new_records_carry(spec) -> None:
    """The leaderboard's name for a record without checkpoint_name is the one `evalsuite run` now records."""
    from evalsuite.checkpoints import checkpoint_name
    from leaderboard.aggregate import name_from_spec

    assert name_from_spec(spec) == checkpoint_name(spec)


def test_rank_table_means_and_average_ranks_by_hand(tmp_path) -> None:
    """linear_transfer's checkpoints x datasets: each row at its layer with the most numbers, then the best mean;
    ranks per column among the same protocol (ties share the mean rank), averaged over the row's columns; the
    summary records are not columns; another protocol is ranked on its own."""
    from leaderboard.aggregate import rank_table

    def lt(value, dataset, ck, layer="res5", metric="top1", protocol="ericsson21"):
        return rec(value, task="linear_transfer", dataset=dataset, metric=metric, ck=ck, method=ck * 3, layer=layer,
                   protocol=protocol, params={})

    records = [lt(80.0, "cifar10", "a"), lt(50.0, "dtd", "a"), lt(65.0, "all", "a", metric="mean"),
               lt(90.0, "cifar10", "b"), lt(50.0, "dtd", "b"),
               lt(99.0, "cifar10", "b", layer="res4"),  # one number at res4: b is shown at res5, its two numbers
               lt(70.0, "cifar10", "c"),  # no dtd: ranked on cifar10 alone
               lt(10.0, "cifar10", "d", protocol="quick"), lt(5.0, "dtd", "d", protocol="quick")]
    write(tmp_path, records)
    table = rank_table(deduplicate(load_results([tmp_path])), "linear_transfer")
    assert table.columns == [("cifar10", "top1", ""), ("dtd", "top1", "")]
    rows = {r["ckpt"][0]: r for r in table.rows.to_dict("records")}
    assert rows["b"]["layer"] == "res5" and rows["b"]["mean"] == 70.0 and rows["b"]["n"] == 2
    # cifar10: b 1, a 2, c 3; dtd: a and b tied, 1.5 each
    assert (rows["a"]["avg_rank"], rows["b"]["avg_rank"], rows["c"]["avg_rank"]) == (1.75, 1.25, 3.0)
    assert rows["c"]["mean"] == 70.0 and rows["c"]["n"] == 1 and rows["d"]["avg_rank"] == 1.0
    assert [r["ckpt"][0] for r in table.rows.to_dict("records")] == ["b", "a", "c", "d"]  # by protocol, then rank
