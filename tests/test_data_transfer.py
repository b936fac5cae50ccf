"""The transfer suite's readers (evalsuite/data/transfer.py) on their synthetic twins (synth_transfer.py): every split
against the writer's ground truth and ssl-transfer's split rules (re-implemented here as the reference code writes
them), the published Caltech101 split, `evalsuite data synth|check`, and one-line errors naming the path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from evalsuite.cli import main
from evalsuite.data import DATA_LAYOUT, READERS, TRANSFER_DATASETS, open_dataset, open_transfer
from evalsuite.data.synth_transfer import WRITERS, write_transfer
from evalsuite.data.transfer import caltech101_train_indices
from evalsuite.errors import BadData, UserError

PER_CLASS, CLASSES = 4, 3
OFFICIAL_VAL = ("fgvc_aircraft", "dtd", "flowers102")
HOLDOUT = ("stanford_cars", "food101", "oxford_pets", "sun397")
FEWSHOT = ("eurosat", "isic", "chestx", "cropdisease")
# the names each reader gives the writer's classes 0, 1, 2 (torchvision's own names where it renames them)
CLASS_NAMES = {
    "fgvc_aircraft": ["707-320", "A340-500", "Cessna 172"],  # variants.txt, spaces kept
    "caltech101": ["BACKGROUND_Google", "Faces", "Faces_easy"],
    "stanford_cars": ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"],
    "dtd": ["banded", "blotchy", "braided"],
    "flowers102": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
    "food101": ["apple_pie", "baby_back_ribs", "baklava"],
    "oxford_pets": ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"],
    "sun397": ["abbey", "apartment_building/outdoor", "badlands"],  # a nested class folder
    "eurosat": ["AnnualCrop", "Forest", "HerbaceousVegetation"],
    "isic": ["MEL", "NV", "BCC"],
    "chestx": ["Atelectasis", "Cardiomegaly", "Effusion"],
    "cropdisease": ["Apple___Apple_scab", "Apple___Black_rot", "Apple___Cedar_apple_rust"],
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("transfer") / "data"
    truths: dict[str, dict[str, int]] = {}
    for name in WRITERS:
        truths[name] = {}
        write_transfer(name, root, per_class=PER_CLASS, classes=CLASSES, seed=3, image_size=24, truth=truths[name])
    return root, truths


def reference_holdout(n: int) -> tuple[set[int], set[int]]:
    """ssl-transfer linear.py get_train_valid_loader, as written there: (train, val) indices."""
    indices = list(range(n))
    split = int(np.floor(0.2 * n))
    np.random.seed(0)
    np.random.shuffle(indices)
    return set(indices[split:]), set(indices[:split])


def reference_caltech_train(labels: list[int], per_class: int = 30) -> set[int]:
    """ssl-transfer datasets/caltech101.py create_caltech101_splits, as written there (set: the published train.txt
    lists each drawn image once)."""
    np.random.seed(0)
    class_idxs: dict[int, list[int]] = {label: [] for label in range(max(labels) + 1)}
    for i, label in enumerate(labels):
        class_idxs[label].append(i)
    train_idxs: list[int] = []
    for i in class_idxs:
        train_idxs.extend(np.sort(np.random.choice(class_idxs[i], per_class)))
    return {int(i) for i in train_idxs}


def open_all(root: Path, name: str) -> dict:
    return {s: open_dataset(name, root / DATA_LAYOUT[name], s) for s in TRANSFER_DATASETS[name].splits}


@pytest.mark.parametrize("name", list(WRITERS))
def test_reader_matches_the_written_truth(written, name: str):
    root, truths = written
    truth = truths[name]
    splits = open_all(root, name)
    n_classes = 7 if name in ("isic", "chestx") else CLASSES  # CD-FSL's fixed seven classes
    for ds in splits.values():
        assert ds.kind == name and len(ds.labels) == len(ds) == len(ds.ids) and len(ds.classes) == n_classes
        assert [ds.classes[label] for label in ds.labels] == [CLASS_NAMES[name][truth[i]] for i in ds.ids]
        ds.load_image(0)
    ids = {s: set(ds.ids) for s, ds in splits.items()}
    assert all(len(ids[s]) == len(splits[s]) for s in ids)  # no image twice in a split
    n = PER_CLASS * CLASSES
    if name in FEWSHOT:  # one pool: every image the reader should keep (ChestX's left-out rows are not in truth)
        assert ids == {"test": set(truth)}
        return
    assert not ids["train"] & ids["val"] and ids["train"] | ids["val"] == ids["trainval"]
    assert not ids["trainval"] & ids["test"] and ids["trainval"] | ids["test"] == set(truth)
    if name in OFFICIAL_VAL:
        assert [len(splits[s]) for s in ("train", "val", "trainval", "test")] == [n, n, 2 * n, n]
    else:
        if name == "caltech101":  # the reference's draws over the ImageFolder order (class folders, then files)
            order = sorted(truth, key=lambda rel: (rel.split("/")[1], rel))
            drawn = {order[i] for i in reference_caltech_train([truth[r] for r in order])}
            assert ids["trainval"] == drawn and ids["test"] == set(truth) - drawn
        else:
            assert len(splits["trainval"]) == len(splits["test"]) == n
        full = splits["trainval"].ids
        train, val = reference_holdout(len(full))
        assert ids["val"] == {full[i] for i in val} and ids["train"] == {full[i] for i in train}


def test_specs_follow_the_references():
    # ssl-transfer linear.py LINEAR_DATASETS (classes, metric) and CD-FSL's class counts
    reference = {"fgvc_aircraft": (100, "mean_per_class"), "caltech101": (102, "mean_per_class"),
                 "stanford_cars": (196, "top1"), "cifar10": (10, "top1"), "cifar100": (100, "top1"),
                 "dtd": (47, "top1"), "flowers102": (102, "mean_per_class"), "food101": (101, "top1"),
                 "oxford_pets": (37, "mean_per_class"), "sun397": (397, "top1"), "voc2007": (20, "map11"),
                 "eurosat": (10, "top1"), "isic": (7, "top1"), "chestx": (7, "top1"), "cropdisease": (38, "top1")}
    assert {n: (s.num_classes, s.metric) for n, s in TRANSFER_DATASETS.items()} == reference
    assert all(name in READERS and DATA_LAYOUT[name] == s.layout for name, s in TRANSFER_DATASETS.items())


# Caltech101's class sizes (ImageFolder order, BACKGROUND_Google included) and the sha256 of the image names of
# ssl-transfer's published caltech101-splits/train.txt (commit 416913f, one name per line in file order)
CALTECH_SIZES = dict(zip(
    "BACKGROUND_Google Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver "
    "binocular bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair "
    "chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin "
    "dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone "
    "grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop "
    "llama lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda panda pigeon pizza "
    "platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion sea_horse snoopy soccer_ball "
    "stapler starfish stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch water_lilly "
    "wheelchair wild_cat windsor_chair wrench yin_yang".split(),
    [467, 435, 435, 200, 798, 55, 800, 42, 42, 47, 54, 46, 33, 128, 98, 43, 85, 91, 50, 43, 123, 47, 59, 62, 107, 47,
     69, 73, 70, 50, 51, 57, 67, 52, 65, 68, 75, 64, 53, 64, 85, 67, 67, 45, 34, 34, 51, 99, 100, 42, 54, 88, 80, 31,
     64, 86, 114, 61, 81, 78, 41, 66, 43, 40, 87, 32, 76, 55, 35, 39, 47, 38, 45, 53, 34, 57, 82, 59, 49, 40, 63, 39,
     84, 57, 35, 64, 45, 86, 59, 64, 35, 85, 49, 86, 75, 239, 37, 59, 34, 56, 39, 60]))
CALTECH_TRAIN_SHA256 = "33d5e5f0dcdfa98a75abec74d75551f4c1a34675c463e397d2a2f6c68294cec5"


def test_caltech101_split_reproduces_the_published_train_list():
    names = [f"{c}/image_{k:04d}.jpg" for c, n in CALTECH_SIZES.items() for k in range(1, n + 1)]
    labels = np.repeat(np.arange(len(CALTECH_SIZES)), list(CALTECH_SIZES.values()))
    train = caltech101_train_indices(labels)
    assert len(names) == 9144 and len(train) == 2416  # and the test split is the other 6,728
    assert hashlib.sha256("\n".join(names[i] for i in train).encode()).hexdigest() == CALTECH_TRAIN_SHA256


def test_cifar_and_voc_get_the_suite_splits(tmp_path: Path, fixtures_dir: Path):
    from evalsuite.data.cifar import CIFAR
    from evalsuite.data.synthetic import write_cifar10
    from evalsuite.data.voc import VOC2007

    cifar = write_cifar10(tmp_path, seed=0, train_per_class=3, test_per_class=1)
    full = CIFAR(cifar, "train")
    train, val = (open_transfer("cifar10", tmp_path, s) for s in ("train", "val"))
    ref_train, ref_val = reference_holdout(len(full))
    assert len(val) == 6 and np.array_equal(val.labels, full.labels[sorted(ref_val)])
    assert np.array_equal(np.asarray(train.load_image(2)), full.data[sorted(ref_train)[2]])
    assert train.fingerprint() != val.fingerprint() != open_transfer("cifar10", tmp_path, "trainval").fingerprint()
    voc = open_transfer("voc2007", fixtures_dir / "voc2007_mini", "test")
    assert isinstance(voc, VOC2007) and voc.label_matrix.shape[1] == 20


def test_synth_and_check_cli(tmp_path: Path, capsys):
    args = ["data", "synth", "--kind", "transfer", "--size", "0.34", "--image-size", "24", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0

    def tree(d: Path) -> dict[str, str]:
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}

    assert tree(tmp_path / "a") == tree(tmp_path / "b")  # same seed, same bytes (.mat headers included)
    capsys.readouterr()
    for kind in WRITERS:
        assert main(["data", "check", "--kind", kind, "--root", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines().count("ok") == len(WRITERS)
    assert "dtd val: " in out and "chestx test: " in out and "classes=7" in out


def _one_line_error(capsys, args: list[str], path: Path, match: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and match in err, err


def test_missing_or_malformed_data_is_one_line_naming_the_path(written, tmp_path: Path, capsys):
    import shutil

    root, _ = written
    _one_line_error(capsys, ["data", "check", "--kind", "dtd", "--root", str(tmp_path / "nowhere")],
                    tmp_path / "nowhere", "not found")
    _one_line_error(capsys, ["data", "check", "--kind", "food101", "--root", str(tmp_path)],
                    tmp_path / "meta" / "train.json", "not found")
    # malformed: a truncated .mat, an ISIC row with two labels, a partition line without its image
    bad = tmp_path / "bad"
    for name in ("flowers102", "isic", "sun397"):
        shutil.copytree(root / DATA_LAYOUT[name], bad / DATA_LAYOUT[name])
    (bad / "flowers-102" / "setid.mat").write_bytes(b"MATLAB 5.0 broken")
    _one_line_error(capsys, ["data", "check", "--kind", "flowers102", "--root", str(bad)], bad / "flowers-102",
                    "Flowers102")
    csv = bad / "ISIC" / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], lines[1].replace("0.0", "1.0", 1), *lines[2:]]) + "\n")  # two labels
    _one_line_error(capsys, ["data", "check", "--kind", "isic", "--root", str(bad)], csv, "line 2")
    partition = bad / "SUN397" / "Testing_01.txt"
    partition.write_text(partition.read_text() + "/a/abbey/sun_missing.jpg\n")
    _one_line_error(capsys, ["data", "check", "--kind", "sun397", "--root", str(bad), "--split", "test"],
                    partition, "sun_missing")
    # torchvision finds a dataset by its folder name only; a few-shot set has no train split
    shutil.copytree(root / "stanford_cars", bad / "cars")
    with pytest.raises(BadData, match="folder named 'stanford_cars'"):
        open_transfer("stanford_cars", bad / "cars", "test")
    with pytest.raises(BadData, match="no split 'train'"):
        open_transfer("eurosat", root, "train")
    with pytest.raises(UserError, match="unknown transfer dataset"):
        open_transfer("imagenet_r", root, "test")
