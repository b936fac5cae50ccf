"""Feature extraction through the cache: hits, resume, corruption, precision, bad features; the transforms."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evalsuite.cache import FeatureCache, storage_array
from evalsuite.data import open_dataset
from evalsuite.errors import BadData, BadFeatures, UserError
from evalsuite.features import FeatureExtractor, Transform, preset_precision
from evalsuite.runner import RunOptions, run
from evalsuite.trunks import build_trunk

TF = Transform(size=32)


class CountingTrunk(torch.nn.Module):
    """Wraps a trunk and counts images it has seen."""

    def __init__(self, trunk):
        super().__init__()
        self.inner = trunk
        self.tap_names = trunk.tap_names
        self.arch = trunk.arch
        self.seen = 0

    def forward(self, x, taps=None):
        self.seen += x.shape[0]
        return self.inner(x, taps)


def _extractor(cache_root: Path, trunk=None, **kw) -> FeatureExtractor:
    trunk = trunk or CountingTrunk(build_trunk("resnet18", seed=0))
    kw.setdefault("precision", "fp32")
    return FeatureExtractor(trunk, "ckpt-test", "resnet18", cache=FeatureCache(cache_root, shard_rows=8),
                            batch_size=4, progress=False, **kw)


@pytest.fixture()
def train_ds(tiny_imagefolder):
    return open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")


def test_second_request_reads_the_cache(tmp_path, train_ds) -> None:
    ext = _extractor(tmp_path)
    a = ext.features(train_ds, ["res4", "res5"], "goyal", TF)
    assert ext.trunk.seen == len(train_ds) == 48
    b = _extractor(tmp_path).features(train_ds, ["res5", "res4"], "goyal", TF)
    for t in a:
        assert a[t].dtype == np.float16 and a[t].shape[0] == 48
        np.testing.assert_array_equal(a[t], b[t])
    ext2 = _extractor(tmp_path)
    ext2.features(train_ds, ["res5"], "goyal", TF)
    assert ext2.trunk.seen == 0 and ext2.stats["cache_hits"] == 1


def test_cache_key_separates_pooling_transform_precision(tmp_path, train_ds) -> None:
    ext = _extractor(tmp_path)
    g = ext.features(train_ds, ["res5"], "goyal", TF)["res5"]
    a = ext.features(train_ds, ["res5"], "avg", TF)["res5"]
    assert a.shape[1] == 512 and g.shape[0] == a.shape[0] == 48
    ext.features(train_ds, ["res5"], "avg", Transform(size=40))
    assert ext.trunk.seen == 3 * 48  # three keys, three extractions
    assert len(list(tmp_path.rglob("manifest.json"))) == 3
    bf = _extractor(tmp_path, precision="auto")
    if bf.precision == "bf16":
        bf.features(train_ds, ["res5"], "avg", TF)
        assert bf.trunk.seen == 48


def test_resume_recomputes_only_missing_shards(tmp_path, train_ds) -> None:
    full = _extractor(tmp_path / "a").features(train_ds, ["res3", "res5"], "avg", TF)
    ext = _extractor(tmp_path / "b")
    ext.features(train_ds, ["res3", "res5"], "avg", TF)
    # Simulate a kill: manifest never written, one shard of one tap lost.
    entries = [ext.cache.entry(ext.entry_fields(train_ds, t, s, TF), 48)
               for t, s in ext.pool_specs(["res3", "res5"], "avg", TF).items()]
    for e in entries:
        e.manifest_path.unlink()
    entries[1].shard_path(2).unlink()
    again = _extractor(tmp_path / "b")
    out = again.features(train_ds, ["res3", "res5"], "avg", TF)
    assert again.trunk.seen == 8  # exactly one shard of 8 rows recomputed
    for t in full:
        np.testing.assert_array_equal(full[t], out[t])


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, train_ds, capsys) -> None:
    ext = _extractor(tmp_path)
    ref = ext.features(train_ds, ["res5"], "avg", TF)["res5"]
    entry = ext.cache.entry(ext.entry_fields(train_ds, "res5", ext.pool_specs(["res5"], "avg", TF)["res5"], TF), 48)
    shard = entry.shard_path(1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the payload: still a loadable .npy, wrong content
    shard.write_bytes(bytes(data))
    again = _extractor(tmp_path)
    out = again.features(train_ds, ["res5"], "avg", TF)["res5"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("evalsuite: warning: feature cache entry") and "corrupt" in err[0]
    assert again.trunk.seen == 48
    np.testing.assert_array_equal(ref, out)


def test_bf16_fast_path_close_to_fp32(tmp_path, train_ds) -> None:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 support")
    f32 = _extractor(tmp_path, precision="fp32").features(train_ds, ["res4"], "avg", TF)["res4"].astype(np.float32)
    b16 = _extractor(tmp_path, precision="bf16").features(train_ds, ["res4"], "avg", TF)["res4"].astype(np.float32)
    cos = (f32 * b16).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(b16, axis=1))
    assert cos.min() > 0.99
    assert np.abs(f32 - b16).max() < 0.1 * np.abs(f32).max()


def test_nan_weights_raise_bad_features_and_cache_stays_incomplete(tmp_path, train_ds) -> None:
    trunk = build_trunk("resnet18", seed=0)
    with torch.no_grad():
        trunk.layer3[0].conv1.weight[0, 0, 0, 0] = float("nan")
    ext = _extractor(tmp_path, trunk=trunk)
    with pytest.raises(BadFeatures, match="NaN"):
        ext.features(train_ds, ["res4"], "avg", TF)
    assert not list(tmp_path.rglob("manifest.json"))


def test_values_beyond_float16_are_cached_in_float32(tmp_path, train_ds) -> None:
    """A trunk whose res5 reaches ~1e5 (BatchNorm scales x 3e5, as a few-step checkpoint whose running
    statistics lag its weights): that tap is cached and returned in float32, exactly as computed; the
    in-range tap stays float16; a second request reads both from the cache."""
    trunk = build_trunk("resnet18", seed=0)
    with torch.no_grad():
        trunk.layer4[1].bn2.weight.mul_(3e5)
        trunk.layer4[1].bn2.bias.mul_(3e5)
    out = _extractor(tmp_path, trunk=CountingTrunk(trunk)).features(train_ds, ["res3", "res5"], "avg", TF)
    x = torch.stack([TF(train_ds.load_image(i)) for i in range(len(train_ds))])
    with torch.inference_mode():
        ref = trunk.eval()(x, ["res5"])["res5"].float().mean((2, 3)).numpy()
    assert np.abs(ref).max() > 1e5  # beyond float16 (65504)
    assert out["res5"].dtype == np.float32 and out["res3"].dtype == np.float16
    np.testing.assert_allclose(out["res5"], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    again = _extractor(tmp_path, trunk=CountingTrunk(trunk))
    cached = again.features(train_ds, ["res3", "res5"], "avg", TF)
    assert again.trunk.seen == 0
    np.testing.assert_array_equal(cached["res5"], out["res5"])
    np.testing.assert_array_equal(cached["res3"], out["res3"])


def test_storage_array_keeps_float16_where_it_fits() -> None:
    fits = np.array([[1.5, -65504.0]], np.float32)
    assert storage_array(fits).dtype == np.float16
    big = np.array([[1.5, 70000.0]], np.float32)
    assert storage_array(big).dtype == np.float32 and storage_array(big)[0, 1] == 70000.0
    assert storage_array(np.array([[np.inf]], np.float32)).dtype == np.float16  # not finite anyway: no promotion


def test_empty_and_corrupt_images(tmp_path, tiny_imagefolder) -> None:
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    with pytest.raises(BadData, match="empty"):
        open_dataset("imagefolder", root, "train")
    src = tiny_imagefolder / "imagefolder" / "train" / "disc" / "00000.jpg"
    (root / "train" / "a" / "ok.jpg").write_bytes(src.read_bytes())
    (root / "train" / "a" / "zz_bad.jpg").write_bytes(src.read_bytes()[:200])
    ds = open_dataset("imagefolder", root, "train")
    with pytest.raises(BadData) as e:
        _extractor(tmp_path / "c").features(ds, ["res5"], "avg", TF)
    assert "zz_bad.jpg" in str(e.value)
    assert not list((tmp_path / "c").rglob("manifest.json"))


def test_workers_give_identical_features(tmp_path, train_ds) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = _extractor(tmp_path / "a", workers=0).features(train_ds, ["res5"], "avg", TF)["res5"]
        b = _extractor(tmp_path / "b", workers=2).features(train_ds, ["res5"], "avg", TF)["res5"]
    np.testing.assert_array_equal(a, b)


def test_prepare_removes_leftover_temporaries_only(tmp_path) -> None:
    entry = FeatureCache(tmp_path, shard_rows=8).entry({"tap": "res5"}, rows=16)
    entry.prepare()
    entry.write_shard(0, np.ones((8, 4), dtype=np.float32))
    # what a writer killed mid-shard leaves: evalsuite.io's temporary name beside the target
    (entry.dir / f".{entry.shard_path(1).name}.abc123.tmp").write_bytes(b"half")
    entry.prepare()
    assert sorted(p.name for p in entry.dir.iterdir()) == ["key.json", "shard_00000.npy"]
    assert entry.missing_shards() == [1]


# ---------------------------------------------------------------------- transforms


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255


RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalisation: the transform's pixels in [0, 1]


def test_scale_square_resizes_the_shorter_side_then_the_whole_image() -> None:
    """VISSL's VOC07 SVM transform, Resize(256) then Resize([224, 224]), here 24 then 16: by hand with PIL."""
    img = _image(60, 40)
    got = Transform(size=16, mode="scale_square", resize=24, **RAW)(img).numpy()
    ref = img.resize((36, 24), Image.BILINEAR).resize((16, 16), Image.BILINEAR)  # 60 x 40 -> 36 x 24 -> 16 x 16
    np.testing.assert_allclose(got, _pixels(ref), atol=1e-6)
    one_step = Transform(size=16, mode="square", **RAW)(img).numpy()
    assert np.abs(got - one_step).max() > 0.02  # one PIL step is not the two


def test_square_center_crop_is_cdfsls_scale_then_center_crop() -> None:
    """CD-FSL's evaluation transform (the few-shot task): Scale([r, r]) of the whole image, then CenterCrop(s), by
    hand with PIL on a non-square image (unlike center_crop, which keeps the aspect ratio); the tensor path (GPU
    decoding) within a grey level."""
    import torch

    img = _image(60, 40)
    tf = Transform(size=16, mode="square_center_crop", resize=20, **RAW)
    ref = img.resize((20, 20), Image.BILINEAR).crop((2, 2, 18, 18))
    np.testing.assert_allclose(tf(img).numpy(), _pixels(ref), atol=1e-6)
    kept_aspect = Transform(size=16, mode="center_crop", resize=20, **RAW)(img).numpy()
    assert np.abs(tf(img).numpy() - kept_aspect).max() > 0.02
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert float((tf.on_tensor(tensor) - tf(img)).abs().max()) <= 1.0 / 255 + 1e-6


def test_cv2_bilinear_averages_2x2_blocks_on_a_2x_reduction() -> None:
    """OpenCV's INTER_LINEAR samples at half-pixel centres without antialiasing: halving a 4x4 image gives each
    2x2 block's mean (by hand); PIL's bilinear filter spreads wider."""
    grey = np.array([[0, 40, 80, 120], [160, 200, 240, 20], [60, 100, 140, 180], [220, 10, 30, 50]], np.uint8)
    img = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    blocks = np.array([[(0 + 40 + 160 + 200) / 4, (80 + 120 + 240 + 20) / 4],
                       [(60 + 100 + 220 + 10) / 4, (140 + 180 + 30 + 50) / 4]]) / 255
    for mode in ("square", "scale_square"):  # scale_square: the shorter side is already 4
        got = Transform(size=2, mode=mode, resize=4, interpolation="cv2_bilinear", **RAW)(img).numpy()
        np.testing.assert_allclose(got, np.broadcast_to(blocks, (3, 2, 2)), atol=1e-6)
    pil = Transform(size=2, mode="square", **RAW)(img).numpy()
    assert np.abs(pil - blocks).max() > 0.02


def test_cv2_bilinear_matches_opencv() -> None:
    """fair_ssb's scale (shorter side, longer floor(long / short * size)) then global_resize, on float pixels."""
    cv2 = pytest.importorskip("cv2")
    img = _image(53, 37, seed=1)
    got = Transform(size=24, mode="scale_square", resize=32, interpolation="cv2_bilinear", **RAW)(img).numpy()
    f = np.asarray(img, dtype=np.float32)
    f = cv2.resize(f, (int(np.floor(53 / 37 * 32)), 32))  # (width, height)
    ref = cv2.resize(f, (24, 24)).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_knn_interpolation_comes_from_the_protocol() -> None:
    """goyal19 knn = DINO's eval_knn.py transform: Resize(256, interpolation=3) (bicubic), CenterCrop(224)."""
    from torchvision import transforms as T

    import tasks.knn.task as knn

    img = _image(300, 260, seed=2)
    tf = Transform.from_protocol(knn.task.default_protocol("goyal19"))
    assert (tf.mode, tf.resize, tf.size, tf.interpolation) == ("center_crop", 256, 224, "bicubic")
    dino = T.Compose([T.Resize(256, interpolation=3), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    np.testing.assert_allclose(tf(img).numpy(), dino(img).numpy(), atol=1e-5)
    assert Transform.from_protocol(knn.task.default_protocol("vissl")).interpolation == "bilinear"
    with pytest.raises(UserError, match="interpolation"):
        Transform(interpolation="lanczos")


# ---------------------------------------------------------------------- conv1 pooling and precision in the key


def test_conv1_pooling_of_goyal_and_vissl_are_cached_apart(tmp_path, train_ds) -> None:
    """ResNet-50 conv1 at 224 px: padding left out (goyal) or counted (vissl) differ at the border windows only,
    and each pooling has its own cache entry (the op is in the key)."""
    trunk = CountingTrunk(build_trunk("resnet50", seed=0))
    ext = FeatureExtractor(trunk, "r50", "resnet50", cache=FeatureCache(tmp_path), precision="fp32", batch_size=16,
                           progress=False)
    tf = Transform(size=224)
    g = ext.features(train_ds, ["conv1"], "goyal", tf)["conv1"].reshape(-1, 64, 12, 12)
    v = ext.features(train_ds, ["conv1"], "vissl", tf)["conv1"].reshape(-1, 64, 12, 12)
    assert trunk.seen == 2 * 48 and len(list(tmp_path.rglob("manifest.json"))) == 2
    # border windows hold 6 of 10 rows/columns inside the map: 36 of 100 cells at a corner, 60 on an edge
    np.testing.assert_allclose(v[:, :, 0, 0], g[:, :, 0, 0] * 36 / 100, rtol=2e-3, atol=1e-6)  # float16 cache
    np.testing.assert_allclose(v[:, :, 0, 5], g[:, :, 0, 5] * 60 / 100, rtol=2e-3, atol=1e-6)
    np.testing.assert_array_equal(v[:, :, 1:-1, 1:-1], g[:, :, 1:-1, 1:-1])
    specs = {m: ext.pool_specs(["conv1"], m, tf)["conv1"] for m in ("goyal", "vissl")}
    fields = {m: ext.entry_fields(train_ds, "conv1", specs[m], tf)["pooling"]["op"] for m in specs}
    assert fields == {"goyal": "avg_pool(k=10,s=10,p=4,pad=excluded)", "vissl": "avg_pool(k=10,s=10,p=4,pad=counted)"}


def test_presets_choose_the_extraction_precision() -> None:
    """The references extract in fp32: goyal19 and vissl default to it, quick keeps the fast path, and an
    explicit --precision wins."""
    assert RunOptions(checkpoint="x").precision is None
    assert preset_precision("goyal19") == preset_precision("vissl") == "fp32"
    assert preset_precision("quick") == "auto" and preset_precision("goyal19", "bf16") == "bf16"


def test_run_records_the_presets_precision(tmp_path, tiny_imagefolder) -> None:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 support: auto is fp32 too")
    got = {}
    for preset in ("goyal19", "quick"):
        report = run(RunOptions(checkpoint="random:resnet18", tasks=["centroid"], preset=preset, layers=["res5"],
                                overrides=["centroid.image_size=32"], data_root=tiny_imagefolder,
                                out=tmp_path / preset, cache_dir=tmp_path / "cache", progress=False))
        got[preset] = {r.params["feature_precision"] for r in report.results}
    assert got == {"goyal19": {"fp32"}, "quick": {"bf16"}}
