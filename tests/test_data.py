"""segany.data: manifest, DAVIS, folder and COCO loaders on tiny synthetic sets."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segany.data import (
    CocoDataset,
    DatasetError,
    DavisDataset,
    FolderDataset,
    ManifestDataset,
    MaskSample,
    load_mask,
    load_sample,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
H, W = 24, 32


def _image(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _save_mask(path: Path, mask: np.ndarray, style: str = "1bit") -> None:
    if style == "1bit":
        Image.fromarray(mask.astype(bool)).save(path)
    elif style == "01":
        Image.fromarray(mask.astype(np.uint8)).save(path)
    elif style == "255":
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    else:
        raise AssertionError(style)


def _make_manifest_set(root: Path, masks: list[tuple[str, np.ndarray, str]]) -> list[dict]:
    """root/images/<id>.png, root/masks/<id>_<k>.png, root/manifest.jsonl."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    records = []
    counts: dict[str, int] = {}
    for image_id, mask, style in masks:
        img_path = root / "images" / f"{image_id}.png"
        if not img_path.exists():
            Image.fromarray(_image(len(counts))).save(img_path)
        k = counts.get(image_id, 0)
        counts[image_id] = k + 1
        mask_rel = f"masks/{image_id}_{k:02d}.png"
        _save_mask(root / mask_rel, mask, style)
        records.append(
            {
                "image_id": image_id,
                "image": f"images/{image_id}.png",
                "mask": mask_rel,
                "area": int(mask.sum()),
                "category": "thing" if k == 0 else "stuff",
                "kind": "whole",
            }
        )
    with open(root / "manifest.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


# --------------------------------------------------------------------------- manifest
def test_manifest_loads_samples_and_masks(tmp_path: Path) -> None:
    m0, m1, m2 = _rect(2, 10, 3, 9), _rect(12, 20, 10, 30), _rect(0, 5, 0, 5)
    _make_manifest_set(tmp_path, [("a", m0, "1bit"), ("a", m1, "255"), ("b", m2, "01")])
    ds = ManifestDataset(tmp_path)
    assert len(ds) == 3
    s = ds[1]
    assert isinstance(s, MaskSample)
    assert s.image_path == tmp_path / "images" / "a.png"
    assert s.mask_path == tmp_path / "masks" / "a_01.png"
    assert s.category == "stuff"
    assert s.meta["kind"] == "whole" and s.meta["area"] == int(m1.sum())
    assert s.name == "a_01"
    for sample, expected in zip(ds, (m0, m1, m2)):
        image, mask, ignore = ds.load(sample)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert mask.dtype == bool and mask.shape == (H, W)
        assert np.array_equal(mask, expected)
        assert ignore is None
    image, _, _ = ds.load(0)  # by index
    assert np.array_equal(image, _image(0))


def test_mask_values_above_zero_are_object(tmp_path: Path) -> None:
    values = np.zeros((H, W), dtype=np.uint8)
    values[1:4, 1:4] = 3
    values[10:12, 5:9] = 128
    Image.fromarray(values).save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.png"), values > 0)
    assert np.array_equal(load_mask(tmp_path / "m.png", value=128), values == 128)
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[5:7, 5:7, 2] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(load_mask(tmp_path / "rgb.png"), rgb.max(axis=2) > 0)


def test_manifest_missing_files(tmp_path: Path) -> None:
    _make_manifest_set(tmp_path, [("a", _rect(2, 10, 3, 9), "1bit")])
    (tmp_path / "masks" / "a_00.png").unlink()
    with pytest.raises(DatasetError, match="a_00.png"):
        ManifestDataset(tmp_path)
    # Without the construction-time check the error comes at load time, still naming the file.
    ds = ManifestDataset(tmp_path, check_files=False)
    with pytest.raises(DatasetError, match="a_00.png"):
        ds.load(0)
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.png.*not found"):
        ManifestDataset(tmp_path)
    with pytest.raises(DatasetError, match="manifest"):
        ManifestDataset(tmp_path / "nowhere")


def test_manifest_bad_lines(tmp_path: Path) -> None:
    _make_manifest_set(tmp_path, [("a", _rect(2, 10, 3, 9), "1bit")])
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DatasetError, match=r"manifest.jsonl.*line 2"):
        ManifestDataset(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"image": "images/a.png"}\n')
    with pytest.raises(DatasetError, match="lacks mask"):
        ManifestDataset(tmp_path)


def test_wrong_size_mask(tmp_path: Path) -> None:
    _make_manifest_set(tmp_path, [("a", _rect(2, 10, 3, 9, h=H + 1), "1bit")])
    ds = ManifestDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"a_00\.png.*same size"):
        ds.load(0)


def test_empty_mask_error_and_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = np.zeros((H, W), dtype=bool)
    _make_manifest_set(
        tmp_path, [("a", _rect(2, 10, 3, 9), "1bit"), ("a", empty, "255"), ("b", empty, "1bit")]
    )
    ds = ManifestDataset(tmp_path)
    assert len(ds) == 3
    ds.load(0)
    with pytest.raises(DatasetError, match=r"a_01\.png.*empty"):
        ds.load(1)
    with caplog.at_level(logging.WARNING, logger="segany.data"):
        kept = ManifestDataset(tmp_path, skip_empty=True)
    assert [s.name for s in kept] == ["a_00"]
    assert "a_01.png" in caplog.text and "b_00.png" in caplog.text


def test_corrupt_image_and_mask(tmp_path: Path) -> None:
    _make_manifest_set(
        tmp_path, [("a", _rect(2, 10, 3, 9), "1bit"), ("b", _rect(0, 3, 0, 3), "01")]
    )
    (tmp_path / "images" / "a.png").write_bytes(b"this is not an image")
    good = (tmp_path / "masks" / "b_00.png").read_bytes()
    (tmp_path / "masks" / "b_00.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    ds = ManifestDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"a\.png"):
        ds.load(0)
    with pytest.raises(DatasetError, match=r"b_00\.png"):
        ds.load(1)


def test_dataset_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(DatasetError("x/y.png", "broken")))
    assert isinstance(err, DatasetError) and isinstance(err, ValueError)
    assert err.path == "x/y.png" and str(err) == "x/y.png: broken"


# --------------------------------------------------------------------------- DAVIS / folder
def _make_davis(root: Path) -> tuple[np.ndarray, np.ndarray]:
    for d in ("images", "masks", "instances"):
        (root / d).mkdir(parents=True)
    gt0, gt1 = _rect(3, 9, 4, 12), _rect(10, 20, 1, 30)
    for i, gt in enumerate((gt0, gt1)):
        Image.fromarray(_image(i)).save(root / "images" / f"{i:03d}.jpg", quality=95)
        _save_mask(root / "masks" / f"{i:03d}.png", gt, "255")
        inst = gt.astype(np.uint8)
        inst[gt.nonzero()[0][0], gt.nonzero()[1][0]] = 255  # one "void" pixel
        Image.fromarray(inst, mode="L").convert("P").save(root / "instances" / f"{i:03d}.png")
    return gt0, gt1


def test_davis_layout(tmp_path: Path) -> None:
    gt0, gt1 = _make_davis(tmp_path)
    ds = DavisDataset(tmp_path)
    assert [s.name for s in ds] == ["000", "001"]
    image, mask, ignore = ds.load(1)
    assert image.shape == (H, W, 3) and np.array_equal(mask, gt1) and ignore is None
    _, _, ignore = DavisDataset(tmp_path, ignore_void=True).load(0)
    assert ignore is not None and ignore.sum() == 1 and ignore[3, 4]
    (tmp_path / "masks" / "001.png").unlink()
    with pytest.raises(DatasetError, match="001.png"):
        DavisDataset(tmp_path)


def test_folder_dataset(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    gt = _rect(5, 15, 5, 15)
    Image.fromarray(_image(3)).save(tmp_path / "img" / "cat.png")
    _save_mask(tmp_path / "gt" / "cat.png", gt, "255")
    ds = FolderDataset(tmp_path / "img", tmp_path / "gt", category="cat")
    assert len(ds) == 1 and ds[0].category == "cat"
    assert np.array_equal(ds.load(0)[1], gt)
    Image.fromarray(_image(4)).save(tmp_path / "img" / "dog.jpg")
    with pytest.raises(DatasetError, match="dog.png"):
        FolderDataset(tmp_path / "img", tmp_path / "gt")


# --------------------------------------------------------------------------- COCO
def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _make_coco(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_image(0, 30, 40)).save(tmp_path / "imgs" / "one.png")
    Image.fromarray(_image(1, 30, 40)).save(tmp_path / "imgs" / "two.png")
    rng = np.random.default_rng(5)
    blob = rng.random((30, 40)) > 0.7  # irregular, so a layout mistake cannot pass
    blob[0, 0] = True  # starts with a one: uncompressed counts begin with a 0 run
    ring = _rect(5, 25, 5, 35, 30, 40) & ~_rect(10, 20, 10, 30, 30, 40)
    compressed = mask_utils.encode(np.asfortranarray(ring.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    expected = {
        "poly": _rect(5, 15, 10, 20, 30, 40),
        "rle": ring,
        "raw": blob,
    }
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "height": 30, "width": 40},
            {"id": 2, "file_name": "two.png", "height": 30, "width": 40},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 8, "name": "cat"}],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]],
            },
            {"id": 12, "image_id": 1, "category_id": 8, "iscrowd": 0, "segmentation": compressed},
            {
                "id": 13,
                "image_id": 2,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": _uncompressed_rle(blob),
            },
            {
                "id": 14,
                "image_id": 2,
                "category_id": 8,
                "iscrowd": 1,
                "segmentation": _uncompressed_rle(ring),
            },
        ],
    }
    json_path = tmp_path / "ann.json"
    json_path.write_text(json.dumps(data))
    return json_path, expected


def test_coco_polygon_and_rle_round_trip(tmp_path: Path) -> None:
    json_path, expected = _make_coco(tmp_path)
    ds = CocoDataset(json_path, tmp_path / "imgs")
    assert len(ds) == 3  # the iscrowd annotation is skipped
    assert [s.category for s in ds] == ["dog", "cat", "dog"]
    assert [s.name for s in ds] == ["one_ann11", "one_ann12", "two_ann13"]
    assert all(s.mask_path is None for s in ds)
    for sample, key in zip(ds, ("poly", "rle", "raw")):
        image, mask, _ = ds.load(sample)
        assert image.shape == (30, 40, 3)
        assert np.array_equal(mask, expected[key]), key
    # Generic loader works on COCO samples too.
    assert np.array_equal(load_sample(ds[2])[1], expected["raw"])
    assert len(CocoDataset(json_path, tmp_path / "imgs", include_crowd=True)) == 4


def test_coco_errors(tmp_path: Path) -> None:
    json_path, _ = _make_coco(tmp_path)
    data = json.loads(json_path.read_text())
    data["annotations"][1]["segmentation"]["size"] = [31, 40]
    data["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    json_path.write_text(json.dumps(data))
    ds = CocoDataset(json_path, tmp_path / "imgs")
    with pytest.raises(DatasetError, match=r"annotation 11.*polygon"):
        ds.load(0)
    with pytest.raises(DatasetError, match=r"annotation 12.*size"):
        ds.load(1)
    (tmp_path / "imgs" / "two.png").unlink()
    with pytest.raises(DatasetError, match="two.png"):
        CocoDataset(json_path, tmp_path / "imgs")


# --------------------------------------------------------------------------- real data
@pytest.mark.parametrize("which", ["train/PennFudanPed", "val/DAVIS"])
def test_real_samples(which: str) -> None:
    root = SHARED / which
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = DavisDataset(root) if which == "val/DAVIS" else ManifestDataset(root)
    assert len(ds) > 2
    for sample in ds[:2]:
        image, mask, _ = ds.load(sample)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert 0 < mask.sum() < mask.size
        if "area" in sample.meta:
            assert int(mask.sum()) == sample.meta["area"]
