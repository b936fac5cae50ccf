"""Small synthetic stand-ins for the transfer suite (:mod:`evalsuite.data.transfer`), each written in the exact
on-disk layout its reader expects: torchvision's dataset classes (their folder names, list files, JSON and the
devkit ``.mat`` files written with scipy) and CD-FSL's CSVs and folders.

Class ``c`` is the ``c``-th object shape of :func:`evalsuite.data.synthetic.shape_image` (a textured, cluttered
background and one object in a random colour), so the sets are learnable and colour alone does not give the class.
Class names are real ones of each dataset (the first ``classes`` of a short list). ``per_class`` images per class are
written for each split the dataset's files define (train / val / test, train / test, or one pool for the few-shot
sets); Caltech101, which the reader splits itself (30 draws with replacement per class for train), gets
``30 + per_class`` per class. ChestX also gets rows its reader must leave out ("No Finding", Pneumonia, Hernia,
several findings), SUN397 images outside partition 1.

Deterministic: the same arguments give byte-identical files (JPEG/PNG encoders are deterministic, the MAT headers are
pinned). Each dataset is written into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..io import replace_dir
from .render import write_text

# real class names of each dataset (the synthetic set uses the first `classes`)
NAMES: dict[str, tuple[str, ...]] = {
    "fgvc_aircraft": ("707-320", "A340-500", "Cessna 172", "F-16A/B", "DHC-8-100", "Falcon 2000", "Tu-134", "Yak-42"),
    "caltech101": ("BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes",
                   "anchor"),
    "stanford_cars": ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
                      "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001",
                      "Acura ZDX Hatchback 2012", "Aston Martin V8 Vantage Convertible 2012"),
    "dtd": ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked"),
    "flowers102": tuple(str(k) for k in range(1, 9)),  # imagelabels.mat holds 1-based numbers
    "food101": ("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad", "beignets",
                "bibimbap"),
    # breeds in the class-id order of list.txt (species and breed id in PET_SPECIES)
    "oxford_pets": ("Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
                    "Bengal", "Birman", "Bombay"),
    "sun397": ("/a/abbey", "/a/apartment_building/outdoor", "/b/badlands", "/b/bakery/shop", "/c/canyon",
               "/d/desert/sand", "/f/forest_path", "/h/highway"),
    "eurosat": ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                "Residential"),
    "isic": ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
    "chestx": ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax"),
    "cropdisease": ("Apple___Apple_scab", "Apple___Black_rot", "Apple___Cedar_apple_rust", "Apple___healthy",
                    "Blueberry___healthy", "Cherry_(including_sour)___Powdery_mildew",
                    "Cherry_(including_sour)___healthy", "Corn_(maize)___Cercospora_leaf_spot Gray_leaf_spot"),
}
PET_SPECIES = {"Abyssinian": (1, 1), "Bengal": (1, 2), "Birman": (1, 3), "Bombay": (1, 4),
               "american_bulldog": (2, 1), "american_pit_bull_terrier": (2, 2), "basset_hound": (2, 3),
               "beagle": (2, 4)}
CALTECH_DRAWS = 30  # the reader's draws per class for train
DEFAULT_PER_CLASS = 6
DEFAULT_CLASSES = 5  # ISIC and ChestX: all 7, their readers' class lists are fixed


class _Writer:
    """Writes images of (split, class, k) into ``tmp`` and records each one's class in ``truth``."""

    def __init__(self, name: str, tmp: Path, per_class: int, classes: int, seed: int, size: int,
                 truth: dict[str, int] | None):
        self.name, self.tmp, self.seed, self.size = name, tmp, seed, size
        self.per_class, self.classes = per_class, classes
        self.code = sorted(NAMES).index(name)  # each dataset draws its own images
        self.truth = truth if truth is not None else {}
        self.names = NAMES[name][:classes]

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 30, self.code, *key])

    def image(self, rel: str, split: int, c: int, k: int, mode: str = "RGB", label: int | None = None) -> None:
        """Class ``c``'s ``k``-th image of split code ``split`` at ``tmp/rel``; ``label`` (default ``c``) is
        recorded as its truth, ``-1`` records nothing (an image the reader must leave out)."""
        from .synthetic import SHAPES, shape_image

        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = shape_image(self.rng(split, c, k), SHAPES[c % len(SHAPES)], self.size).convert(mode)
        if path.suffix.lower() == ".png":
            img.save(path, format="PNG")
        else:
            img.save(path, format="JPEG", quality=90)
        label = c if label is None else label
        if label >= 0:
            self.truth[rel] = label

    def ids(self, n: int, lo: int, hi: int, key: int = 99) -> list[int]:
        """``n`` distinct random integers in [lo, hi), ascending (file ids like the real ones)."""
        return sorted(int(v) + lo for v in self.rng(key).choice(hi - lo, n, replace=False))

    def items(self, splits: tuple[str, ...]) -> list[tuple[int, str, int, int]]:
        """(split code, split, class, k) for ``per_class`` images of each class in each split."""
        return [(s, split, c, k) for s, split in enumerate(splits) for c in range(self.classes)
                for k in range(self.per_class)]


def _savemat(path: Path, data: dict) -> None:
    import scipy.io as sio

    from .render_nyu import _fixed_mat5_header

    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, data)
    _fixed_mat5_header(path)


def _aircraft(w: _Writer) -> None:
    """fgvc-aircraft-2013b/data/images/<id>.jpg, variants.txt, images_variant_{train,val,trainval,test}.txt."""
    items = w.items(("train", "val", "test"))
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for (s, split, c, k), i in zip(items, w.ids(len(items), 1000000, 10000000)):
        w.image(f"data/images/{i:07d}.jpg", s, c, k)
        lines[split].append(f"{i:07d} {w.names[c]}\n")
    lines["trainval"] = sorted(lines["train"] + lines["val"])
    for split, ls in lines.items():
        write_text(w.tmp / "data" / f"images_variant_{split}.txt", "".join(sorted(ls)))
    write_text(w.tmp / "data" / "variants.txt", "".join(f"{n}\n" for n in w.names))


def _caltech101(w: _Writer) -> None:
    """caltech101/101_ObjectCategories/<class>/image_<NNNN>.jpg (1-based, consecutive)."""
    for c, name in enumerate(w.names):
        for k in range(CALTECH_DRAWS + w.per_class):
            w.image(f"101_ObjectCategories/{name}/image_{k + 1:04d}.jpg", 0, c, k)


def _cars(w: _Writer) -> None:
    """stanford_cars/devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat, cars_{train,test}/."""
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    _savemat(w.tmp / "devkit" / "cars_meta.mat", {"class_names": np.array(w.names, dtype=object)})
    for s, split in enumerate(("train", "test")):
        order = w.rng(s, 98).permutation(w.classes * w.per_class)  # classes interleaved, as in the real files
        annos = np.zeros(len(order), dtype=[(f, object) for f in fields])
        for n, j in enumerate(order, 1):
            c, k = divmod(int(j), w.per_class)
            w.image(f"cars_{split}/{n:05d}.jpg", s, c, k)
            annos[n - 1] = (np.uint16(1), np.uint16(1), np.uint16(w.size), np.uint16(w.size), np.uint8(c + 1),
                            f"{n:05d}.jpg")
        path = "devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        _savemat(w.tmp / path, {"annotations": annos})


def _dtd(w: _Writer) -> None:
    """dtd/dtd/images/<class>/<class>_<NNNN>.jpg and dtd/dtd/labels/{train,val,test}1.txt (partition 1)."""
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for s, split, c, k in w.items(("train", "val", "test")):
        rel = f"{w.names[c]}/{w.names[c]}_{s * w.per_class + k + 1:04d}.jpg"
        w.image(f"dtd/images/{rel}", s, c, k)
        lines[split].append(rel + "\n")
    for split, ls in lines.items():
        write_text(w.tmp / "dtd" / "labels" / f"{split}1.txt", "".join(ls))


def _flowers102(w: _Writer) -> None:
    """flowers-102/jpg/image_<NNNNN>.jpg, imagelabels.mat (1-based labels) and setid.mat (trnid, valid, tstid)."""
    items = w.items(("train", "val", "test"))
    order = w.rng(97).permutation(len(items))  # image ids interleave classes and splits, as in the real set
    labels = np.zeros(len(items), np.uint8)
    ids: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    for image_id, j in enumerate(order, 1):
        s, split, c, k = items[int(j)]
        w.image(f"jpg/image_{image_id:05d}.jpg", s, c, k)
        labels[image_id - 1] = c + 1
        ids[("trnid", "valid", "tstid")[s]].append(image_id)
    _savemat(w.tmp / "imagelabels.mat", {"labels": labels[None, :]})
    _savemat(w.tmp / "setid.mat", {k: np.array(sorted(v), np.uint16)[None, :] for k, v in ids.items()})


def _food101(w: _Writer) -> None:
    """food-101/images/<class>/<id>.jpg and meta/{train,test}.{json,txt}, classes.txt, labels.txt."""
    items = w.items(("train", "test"))
    meta: dict[str, dict[str, list[str]]] = {"train": {n: [] for n in w.names}, "test": {n: [] for n in w.names}}
    for (s, split, c, k), i in zip(items, w.ids(len(items), 100000, 4000000)):
        rel = f"{w.names[c]}/{i}"
        w.image(f"images/{rel}.jpg", s, c, k)
        meta[split][w.names[c]].append(rel)
    for split, d in meta.items():
        write_text(w.tmp / "meta" / f"{split}.json", json.dumps(d))
        write_text(w.tmp / "meta" / f"{split}.txt", "".join(f"{r}\n" for n in w.names for r in d[n]))
    write_text(w.tmp / "meta" / "classes.txt", "".join(f"{n}\n" for n in w.names))
    write_text(w.tmp / "meta" / "labels.txt", "".join(f"{n.replace('_', ' ').capitalize()}\n" for n in w.names))


def _pets(w: _Writer) -> None:
    """oxford-iiit-pet/images/<Breed>_<n>.jpg, annotations/{trainval,test,list}.txt ("<image> <class> <species>
    <breed>", class ids 1-based in breed order)."""
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for s, split, c, k in w.items(("trainval", "test")):
        breed = w.names[c]
        image = f"{breed}_{s * w.per_class + k + 1}"
        w.image(f"images/{image}.jpg", s, c, k)
        species, breed_id = PET_SPECIES[breed]
        lines[split].append(f"{image} {c + 1} {species} {breed_id}\n")
    for split, ls in lines.items():
        write_text(w.tmp / "annotations" / f"{split}.txt", "".join(sorted(ls)))
    header = ("#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
              "#BREED ID: 1-25:Cat 1:12:Dog\n#All images with 1st letter as captial are cat images\n"
              "#images with small first letter are dog images\n")
    write_text(w.tmp / "annotations" / "list.txt", header + "".join(sorted(lines["trainval"] + lines["test"])))


def _sun397(w: _Writer) -> None:
    """SUN397/ClassName.txt, SUN397/<letter>/<class>/sun_<16 letters>.jpg, Training_01.txt / Testing_01.txt
    (partition 1), and one image per class outside the partition."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lines: dict[str, list[str]] = {"Training_01": [], "Testing_01": []}
    extra = [(2, "extra", c, 0) for c in range(w.classes)]  # in no partition file: the reader must skip them
    for s, split, c, k in w.items(("Training_01", "Testing_01")) + extra:
        rel = f"{w.names[c]}/sun_{''.join(w.rng(s, c, k, 96).choice(letters, 16))}.jpg"
        w.image(rel.lstrip("/"), s, c, k, label=-1 if split == "extra" else c)
        lines.setdefault(split, []).append(rel + "\n")
    for split in ("Training_01", "Testing_01"):
        write_text(w.tmp / f"{split}.txt", "".join(lines[split]))
    write_text(w.tmp / "ClassName.txt", "".join(f"{n}\n" for n in w.names))


def _eurosat(w: _Writer) -> None:
    """eurosat/2750/<Class>/<Class>_<n>.jpg (EuroSAT RGB)."""
    for s, _, c, k in w.items(("all",)):
        w.image(f"2750/{w.names[c]}/{w.names[c]}_{k + 1}.jpg", s, c, k)


def _isic(w: _Writer) -> None:
    """ISIC/ISIC2018_Task3_Training_Input/ISIC_<7 digits>.jpg and the one-hot ground-truth CSV (all 7 columns)."""
    from .cdfsl import ISIC_CLASSES, ISIC_CSV, ISIC_IMAGES

    items = w.items(("all",))
    rows = ["image," + ",".join(ISIC_CLASSES) + "\n"]
    for (s, _, c, k), i in zip(items, w.ids(len(items), 24306, 34321)):
        w.image(f"{ISIC_IMAGES}/ISIC_{i:07d}.jpg", s, c, k)
        rows.append(f"ISIC_{i:07d}," + ",".join("1.0" if j == c else "0.0" for j in range(len(ISIC_CLASSES))) + "\n")
    write_text(w.tmp / ISIC_CSV, "".join(rows))


def _chestx(w: _Writer) -> None:
    """chestX/images/<patient>_<follow-up>.png (grey) and Data_Entry_2017.csv, with rows the reader leaves out."""
    from .cdfsl import CHESTX_CSV, CHESTX_IMAGES

    left_out = ("No Finding", "Pneumonia", "Hernia", "Effusion|Mass")
    items = [(0, w.names[c], c, k) for _, _, c, k in w.items(("all",))]
    items += [(1, finding, j % w.classes, j) for j, finding in enumerate(left_out)]
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"]
    for (s, finding, c, k), patient in zip(items, w.ids(len(items), 1, 30806)):
        image = f"{patient:08d}_000.png"
        w.image(f"{CHESTX_IMAGES}/{image}", s, c, k, mode="L", label=c if s == 0 else -1)
        rows.append(f"{image},{finding},0,{patient},{40 + patient % 40},{'MF'[patient % 2]},PA,"
                    f"{w.size},{w.size},0.143,0.143\n")
    write_text(w.tmp / CHESTX_CSV, rows[0] + "".join(sorted(rows[1:])))


def _cropdisease(w: _Writer) -> None:
    """CropDiseases/dataset/train/<Class>/<uuid>___<tag>.JPG (an ImageFolder, upper-case suffix as the real one)."""
    for s, _, c, k in w.items(("all",)):
        uid = "".join(f"{int(v):02x}" for v in w.rng(s, c, k, 95).integers(0, 256, 16))
        w.image(f"dataset/train/{w.names[c]}/{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:]}___RS_"
                f"{k}.JPG", s, c, k)


WRITERS: dict[str, Callable[[_Writer], None]] = {
    "fgvc_aircraft": _aircraft, "caltech101": _caltech101, "stanford_cars": _cars, "dtd": _dtd,
    "flowers102": _flowers102, "food101": _food101, "oxford_pets": _pets, "sun397": _sun397, "eurosat": _eurosat,
    "isic": _isic, "chestx": _chestx, "cropdisease": _cropdisease,
}


def write_transfer(name: str, root: str | Path, per_class: int = DEFAULT_PER_CLASS, classes: int | None = None,
                   seed: int = 0, image_size: int = 32, truth: dict[str, int] | None = None) -> Path:
    """Write transfer dataset ``name`` under the data root ``root`` (at its ``DATA_LAYOUT`` folder) and return that
    folder. ``truth``, when given, is filled with {image path relative to that folder: class index} for every image
    the reader should return (the ground truth the tests compare the readers with)."""
    from .transfer import transfer_spec

    if name not in WRITERS:
        raise ValueError(f"no synthetic writer for {name!r}; known: {', '.join(WRITERS)}")
    if classes is None:
        classes = len(NAMES[name]) if name in ("isic", "chestx") else DEFAULT_CLASSES
    if not 2 <= classes <= len(NAMES[name]):
        raise ValueError(f"classes must be in 2..{len(NAMES[name])} for {name}, got {classes}")
    if per_class < 1:
        raise ValueError(f"per_class must be positive, got {per_class}")
    target = Path(root) / transfer_spec(name).layout
    written: dict[str, int] = {}
    with replace_dir(target) as tmp:
        WRITERS[name](_Writer(name, tmp, per_class, classes, seed, image_size, written))
    if truth is not None:
        truth.update(written)
    return target

