"""The CD-FSL few-shot sets torchvision has no class for, in the layouts IBM/cdfsl-benchmark reads
(``datasets/ISIC_few_shot.py``, ``datasets/Chest_few_shot.py``; Ericsson et al. 2021 reuse them as they are).

ISIC 2018 task 3 (``<data root>/ISIC``)::

    ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv   header "image,MEL,NV,...,VASC",
                                                                                  then "<id>,0.0,1.0,..." one-hot rows
    ISIC2018_Task3_Training_Input/<id>.jpg

  The label is the one non-zero column (CD-FSL: ``(labels != 0).argmax(axis=1)``); the classes are the header's
  columns (MEL, NV, BCC, AKIEC, BKL, DF, VASC). A row with no or several non-zero columns is refused here, where
  CD-FSL would silently take the first.

ChestX-ray8 (``<data root>/chestX``)::

    Data_Entry_2017.csv        header, then "<image>,<finding labels>,..." (labels joined by "|")
    images/<image>             every image in one folder (the Kaggle download spreads them over
                               images_001/images ... images_012/images: move them into images/)

  CD-FSL keeps the rows with exactly one finding among its seven classes (Atelectasis, Cardiomegaly, Effusion,
  Infiltration, Mass, Nodule, Pneumothorax): "No Finding", Pneumonia, the other findings and every multi-label row
  are left out.

Both return ``(samples, classes)``: ``[(image path, class index)]`` in file order, and the class names.
CropDisease and EuroSAT are ImageFolders, read with torchvision in :mod:`evalsuite.data.transfer`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import BadData

ISIC_CSV = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_IMAGES = "ISIC2018_Task3_Training_Input"
ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

CHESTX_CSV = "Data_Entry_2017.csv"
CHESTX_IMAGES = "images"
# CD-FSL's labels_maps: Pneumonia is in its used_labels but dropped explicitly, so seven classes remain
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")

Samples = list[tuple[Path, int]]


def _csv_rows(path: Path) -> list[list[str]]:
    """Every row of a CSV file (header included); a missing or unreadable file raises BadData naming it."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except FileNotFoundError:
        raise BadData("label file not found", path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadData(f"unreadable label file ({e})", path) from None
    if len(rows) < 2:
        raise BadData("label file has no rows after its header", path)
    return rows


def isic_samples(root: Path) -> tuple[Samples, list[str]]:
    """ISIC 2018 task 3 training images with their one-hot ground truth."""
    path = root / ISIC_CSV
    rows = _csv_rows(path)
    classes = [c.strip() for c in rows[0][1:]]
    if not classes:
        raise BadData("header names no class columns (expected image,MEL,NV,...)", path)
    samples = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(classes) + 1:
            raise BadData(f"line {n}: {len(row)} columns, the header has {len(classes) + 1}", path)
        try:
            hot = [k for k, v in enumerate(row[1:]) if float(v) != 0]
        except ValueError:
            raise BadData(f"line {n}: a label column is not a number: {row!r}", path) from None
        if len(hot) != 1:
            raise BadData(f"line {n}: expected one non-zero label column, found {len(hot)}", path)
        samples.append((root / ISIC_IMAGES / f"{row[0].strip()}.jpg", hot[0]))
    return samples, classes


def chestx_samples(root: Path) -> tuple[Samples, list[str]]:
    """ChestX-ray8 images with a single finding among CD-FSL's seven classes."""
    path = root / CHESTX_CSV
    index = {c: k for k, c in enumerate(CHESTX_CLASSES)}
    samples = []
    for n, row in enumerate(_csv_rows(path)[1:], 2):
        if len(row) < 2:
            raise BadData(f"line {n}: expected '<image>,<finding labels>,...', got {row!r}", path)
        findings = row[1].split("|")
        if len(findings) == 1 and findings[0] in index:
            samples.append((root / CHESTX_IMAGES / row[0].strip(), index[findings[0]]))
    if not samples:
        raise BadData(f"no row has a single finding among {', '.join(CHESTX_CLASSES)}", path)
    return samples, list(CHESTX_CLASSES)
