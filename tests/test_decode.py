"""Image decoding for extraction: PIL in the loading workers (cpu) or batched torchvision.io.decode_jpeg on the
extraction device (gpu, nvjpeg on CUDA). The GPU path's code runs here on the CPU (decode_jpeg takes the device):
its pixels are PIL's within a grey level (bilinear), its features go to their own cache entries, and asking for
it without CUDA is one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import load_checkpoint
from evalsuite.cli import main
from evalsuite.data import open_dataset
from evalsuite.errors import BadData, UserError
from evalsuite.features import (
    EncodedImage,
    EncodedImages,
    FeatureExtractor,
    Transform,
    TransformedImages,
    decode_images,
    resolve_decode,
)


@pytest.fixture(scope="module")
def train(tiny_imagefolder):
    return open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")  # 48 JPEGs of 32 px


@pytest.mark.parametrize("tf, grey_levels", [
    (Transform(size=24), 1.0),  # PIL's bilinear vs torchvision's antialiased tensor resize: rounding apart
    (Transform(size=64, mode="center_crop"), 1.0),
    (Transform(size=24, mode="scale_square", resize=28, interpolation="cv2_bilinear"), 0.0),  # the same op
    (Transform(size=20, mode="center_crop", interpolation="bicubic"), 6.0),  # measured 5
])
def test_batched_tensor_decoding_gives_pils_pixels(train, tf, grey_levels) -> None:
    items = [EncodedImages(train)[i][0] for i in range(8)]
    assert all(it.encoded for it in items)  # JPEG files travel as bytes
    decoded = decode_images(items, "cpu")  # one batched decode_jpeg call
    std = torch.tensor(tf.std).view(3, 1, 1)
    for i, im in enumerate(decoded):
        assert im.dtype == torch.uint8 and tuple(im.shape) == (3, 32, 32)
        assert torch.equal(im, torch.from_numpy(np.array(train.load_image(i))).permute(2, 0, 1))  # libjpeg both
        diff = (tf.on_tensor(im) - TransformedImages(train, tf)[i][0]).abs() * std * 255
        assert float(diff.max()) <= grey_levels + 1e-3


def test_other_images_and_corrupt_jpegs(tmp_path, train) -> None:
    png = tmp_path / "a.png"
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(png)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    jpeg = EncodedImages(train)[0][0]
    pixels = EncodedImage(torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1).contiguous(), False)
    out = decode_images([jpeg, pixels], "cpu")
    assert tuple(out[0].shape) == (3, 32, 32) and torch.equal(out[1], pixels.data)
    broken = EncodedImage(torch.frombuffer(bytearray(bad.read_bytes()), dtype=torch.uint8), True, str(bad))
    with pytest.raises(BadData, match="unreadable or truncated image") as e:
        decode_images([jpeg, broken], "cpu")
    assert e.value.path == str(bad)


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_pil(train, monkeypatch) -> None:
    """nvjpeg refuses some valid JPEGs (ImageNet's few CMYK ones, say): those are decoded by PIL, not an error."""
    import torchvision.io

    def refuse(*_args, **_kwargs):
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    out = decode_images([EncodedImages(train)[i][0] for i in range(3)], "cpu")
    for i, im in enumerate(out):
        assert torch.equal(im, torch.from_numpy(np.array(train.load_image(i))).permute(2, 0, 1))


def test_gpu_decode_path_features_are_cached_apart(train, tmp_path) -> None:
    """The extractor's GPU path (bytes from the workers, batched decode, the transform on the device), run on the CPU
    as a CUDA device would run it: features within float16 rounding of the PIL path's, in an entry keyed decode=gpu."""
    ck = load_checkpoint("random:resnet18", seed=0)
    tf = Transform(size=32)

    def extractor(decode_path: str) -> FeatureExtractor:
        ext = FeatureExtractor(ck.build_trunk(), ck.sha256, ck.arch, cache=FeatureCache(tmp_path / "c"),
                               precision="fp32", batch_size=16, workers=0, progress=False)
        ext.decode = decode_path  # what resolve_decode("gpu") gives on a CUDA device
        return ext

    cpu = extractor("cpu").features(train, ["res5"], "avg", tf)["res5"].astype(np.float32)
    gpu_ext = extractor("gpu")
    gpu = gpu_ext.features(train, ["res5"], "avg", tf)["res5"].astype(np.float32)
    assert gpu_ext.stats["extracted_images"] == 48  # not the CPU path's entry
    assert np.array_equal(gpu, cpu)  # square resize of a 32 px image to 32 px: no resampling, same decoder here
    keys = [json.loads(p.read_text())["fields"] for p in (tmp_path / "c").rglob("key.json")]
    assert sorted(k.get("decode", "cpu") for k in keys) == ["cpu", "gpu"]


def test_gpu_decoding_without_cuda_is_one_line(tiny_imagefolder, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode("cpu", torch.device("cuda")) == "cpu"
    with pytest.raises(UserError, match="unknown decoder 'nvjpeg'"):
        resolve_decode("nvjpeg", torch.device("cpu"))
    rc = main(["extract", "--checkpoint", "random:resnet18", "--dataset", "imagefolder", "--root",
               str(tiny_imagefolder / "imagefolder"), "--split", "val", "--image-size", "32", "--layers", "res5",
               "--decode", "gpu", "--no-progress", "--cache-dir", str(tmp_path / "c")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("evalsuite: error: --decode gpu decodes JPEGs on the CUDA device that extracts, but no "
                             "CUDA device is available")
    assert not (tmp_path / "c").exists()


def test_a_run_that_decoded_on_the_gpu_records_it(tiny_imagefolder, tmp_path, monkeypatch) -> None:
    """A record of GPU-decoded features says so (feature_decode: gpu); one decoded by PIL carries no such field,
    as every earlier record (so they stay comparable)."""
    import evalsuite.features as features

    args = ["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--protocol", "quick", "--set",
            "image_size=32", "--layers", "res5", "--data-root", str(tiny_imagefolder), "--no-progress",
            "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    monkeypatch.setattr(features, "resolve_decode", lambda decode, device: "gpu")  # as on a CUDA device
    assert main([*args, "--out", str(tmp_path / "gpu")]) == 0
    cpu, gpu = (json.loads((tmp_path / d / "results.jsonl").read_text()) for d in ("cpu", "gpu"))
    assert "feature_decode" not in cpu["params"] and gpu["params"]["feature_decode"] == "gpu"
    assert gpu["value"] == cpu["value"]  # 32 px images at 32 px: the same pixels either way
    assert len(list((tmp_path / "c").rglob("manifest.json"))) == 4  # train and val, once per decoder
