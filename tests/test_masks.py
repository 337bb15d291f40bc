"""segany.masks: RLE, polygons, label maps, overlays, COCO JSON and atomic files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools.coco import COCO

from segany import masks as M

# pycocotools' own decode (used by COCO.annToMask) warns under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def blobs(h: int, w: int, seed: int, sigma: float = 4.0, fill: float = 0.5) -> np.ndarray:
    """Blobby random mask: thresholded blurred noise (parts, holes, nested parts)."""
    noise = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    return smooth > np.quantile(smooth, 1 - fill)


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ring_mask(h: int = 60, w: int = 70) -> tuple[np.ndarray, np.ndarray]:
    """(disk with a hole, the hole)."""
    hole = disk(h, w, 30, 35, 10)
    return disk(h, w, 30, 35, 25) & ~hole, hole


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def shoelace(poly: list[float]) -> float:
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


masks_strategy = arrays(
    bool,
    st.tuples(st.integers(1, 24), st.integers(1, 24)),
    elements=st.booleans(),
)


# ----------------------------------------------------------------------------------- RLE


@settings(max_examples=150, deadline=None, database=None)
@given(masks_strategy)
def test_rle_round_trips_and_matches_segment_anything(mask):
    from segment_anything.utils.amg import mask_to_rle_pytorch

    h, w = mask.shape
    rle = M.encode_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    json.dumps(rle)
    np.testing.assert_array_equal(M.decode_rle(rle), mask)
    np.testing.assert_array_equal(
        M.decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask
    )

    unc = M.mask_to_uncompressed_rle(mask)
    assert unc == mask_to_rle_pytorch(torch.from_numpy(mask[None]))[0]
    decoded = M.decode_rle(unc)
    assert decoded.dtype == bool and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, mask)

    assert M.rle_area(rle) == M.rle_area(unc) == int(mask.sum())
    ys, xs = np.nonzero(mask)
    expected_box = (
        [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
        if mask.any()
        else [0.0, 0.0, 0.0, 0.0]
    )
    assert M.rle_to_bbox(rle) == M.rle_to_bbox(unc) == expected_box


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_rle_empty_and_full(fill):
    mask = np.full((7, 5), bool(fill))
    rle = M.encode_rle(mask)
    np.testing.assert_array_equal(M.decode_rle(rle), mask)
    unc = M.mask_to_uncompressed_rle(mask)
    assert unc["counts"] == ([35] if fill == 0 else [0, 35])
    assert M.rle_area(unc) == int(mask.sum())


def test_rle_batch_matches_single_and_accepts_uint8():
    masks = np.stack([blobs(33, 47, s, sigma=2) for s in range(5)])
    batch = M.encode_rle_batch(masks)
    assert batch == [M.encode_rle(m) for m in masks]
    assert M.encode_rle_batch(list(masks.astype(np.uint8) * 255)) == batch
    assert M.encode_rle_batch(np.asfortranarray(masks)) == batch
    assert M.encode_rle_batch(np.zeros((0, 4, 4), bool)) == []


def test_rle_refuses_float_masks():
    with pytest.raises(ValueError, match="mask > 0"):
        M.encode_rle(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="H x W"):
        M.encode_rle(np.zeros((2, 3, 3), bool))


@pytest.mark.parametrize(
    ("rle", "pattern"),
    [
        ({"size": [2, 2], "counts": [1, 2]}, "add up to 3"),
        ({"size": [2, 2], "counts": [5, -1]}, "non-negative"),
        ({"size": [2, 2], "counts": "04é"}, "ASCII"),
        ({"size": [2, 2], "counts": "~~"}, "characters"),
        ({"size": [2, 2], "counts": "0P"}, "middle of a number"),
        ({"size": [2, 2]}, "'counts'"),
        ({"size": [2], "counts": "4"}, "size"),
        ("not a dict", "dict"),
    ],
)
def test_decode_refuses_malformed_rle(rle, pattern):
    with pytest.raises(ValueError, match=pattern):
        M.decode_rle(rle)


def test_decode_refuses_compressed_counts_longer_than_the_mask():
    # pycocotools would write past the end of its buffer decoding this; it must be refused.
    rle = M.encode_rle(blobs(40, 40, 0, sigma=2))
    with pytest.raises(ValueError, match="add up to 1600"):
        M.decode_rle({"size": [10, 10], "counts": rle["counts"]})
    with pytest.raises(ValueError, match="add up to"):
        M.rle_area({"size": [10, 10], "counts": rle["counts"]})


# ------------------------------------------------------------------------------ polygons


def check_polygons(mask: np.ndarray, polys: list[list[float]]) -> None:
    """Exact rasterisation, valid COCO lists, and shoelace area = pixel count (holes reversed)."""
    for p in polys:
        assert len(p) >= 6 and len(p) % 2 == 0
        assert all(isinstance(v, float) for v in p)
    np.testing.assert_array_equal(M.polygons_to_mask(polys, *mask.shape), mask)
    assert sum(abs(shoelace(p)) for p in polys) == pytest.approx(mask.sum())


def test_polygon_ring_keeps_its_hole():
    mask, hole = ring_mask()
    polys = M.mask_to_polygons(mask)
    assert len(polys) == 1  # one part: the hole is bridged in, not a separate polygon
    check_polygons(mask, polys)
    assert not M.polygons_to_mask(polys, *mask.shape)[hole].any()


def test_polygon_two_blobs_and_object_in_hole():
    h, w = 60, 90
    two = disk(h, w, 30, 20, 12) | disk(h, w, 30, 70, 9)
    polys = M.mask_to_polygons(two)
    assert len(polys) == 2
    check_polygons(two, polys)

    ring, hole = ring_mask()
    inner = disk(*ring.shape, 30, 35, 4)
    nested = ring | inner
    polys = M.mask_to_polygons(nested)
    assert len(polys) == 2
    check_polygons(nested, polys)
    out = M.polygons_to_mask(polys, *nested.shape)
    assert not out[hole & ~inner].any() and out[inner].all()


def test_polygon_tiny_parts_are_kept():
    mask = np.zeros((12, 14), bool)
    mask[3, 4] = True  # single pixel
    single = M.mask_to_polygons(mask)
    assert len(single) == 1
    assert sorted(zip(single[0][0::2], single[0][1::2])) == [(4, 3), (4, 4), (5, 3), (5, 4)]
    mask[8, 1:13] = True  # one-pixel-wide line
    mask[0:12, 12] = True  # one-pixel-wide column, touching the border
    for k in range(5):
        mask[k + 5, k + 3] = True  # diagonal staircase of corner-touching pixels
    check_polygons(mask, M.mask_to_polygons(mask))


def test_polygon_full_and_empty():
    assert M.mask_to_polygons(np.zeros((5, 6), bool)) == []
    full = M.mask_to_polygons(np.ones((5, 6), bool))
    assert len(full) == 1 and len(full[0]) == 8
    assert sorted(zip(full[0][0::2], full[0][1::2])) == [(0, 0), (0, 5), (6, 0), (6, 5)]


@pytest.mark.parametrize("seed", range(6))
def test_polygon_blobby_masks_exact(seed):
    mask = blobs(96 + 17 * seed, 128 - 9 * seed, seed, sigma=2.0 + seed, fill=0.3 + 0.1 * seed)
    polys = M.mask_to_polygons(mask)
    check_polygons(mask, polys)
    assert iou(M.polygons_to_mask(polys, *mask.shape), mask) >= 0.99


def test_polygon_dense_noise_exact():
    # Many holes, corner-touching pixels and nested parts in every configuration.
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w = rng.integers(1, 20, 2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        check_polygons(mask, M.mask_to_polygons(mask))


def test_polygon_tolerance_simplifies_and_keeps_holes():
    mask = disk(200, 200, 100, 100, 80) & ~disk(200, 200, 100, 100, 30)
    exact = M.mask_to_polygons(mask)
    simple = M.mask_to_polygons(mask, tolerance=1.0)
    assert len(simple[0]) < len(exact[0]) / 2
    out = M.polygons_to_mask(simple, 200, 200)
    assert iou(out, mask) >= 0.97
    assert not out[disk(200, 200, 100, 100, 27)].any()
    tiny = np.zeros((10, 10), bool)
    tiny[5, 5] = True
    np.testing.assert_array_equal(
        M.polygons_to_mask(M.mask_to_polygons(tiny, tolerance=5.0), 10, 10), tiny
    )
    with pytest.raises(ValueError, match="tolerance"):
        M.mask_to_polygons(tiny, tolerance=-1)


def test_polygons_to_mask_refuses_short_polygons():
    with pytest.raises(ValueError, match="polygon 0 has 4 coordinates"):
        M.polygons_to_mask([[0, 0, 5, 5]], 10, 10)
    assert not M.polygons_to_mask([], 4, 5).any()


# ----------------------------------------------------------------------------- label maps


def test_label_map_overlap_rules():
    h, w = 20, 30
    big = np.zeros((h, w), bool)
    big[:, :20] = True
    small = np.zeros((h, w), bool)
    small[5:10, 5:10] = True
    mid = np.zeros((h, w), bool)
    mid[8:15, 8:25] = True
    masks = [big, small, mid]

    labels = M.label_map(masks)  # no scores: smaller mask on top
    assert labels.dtype == np.uint8 and labels.shape == (h, w)
    assert labels[0, 0] == 1 and labels[6, 6] == 2 and labels[12, 12] == 3
    assert labels[9, 9] == 2  # small (25 px) beats mid (119 px) and big
    assert labels[0, 25] == 0

    labels = M.label_map(masks, scores=[0.9, 0.5, 0.7])  # higher score on top
    assert labels[6, 6] == 1 and labels[9, 9] == 1 and labels[12, 22] == 3

    labels = M.label_map(masks, scores=[0.5, 0.8, 0.8])  # tie: earlier mask wins
    assert labels[9, 9] == 2 and labels[12, 12] == 3

    with pytest.raises(ValueError, match="2 scores for 3 masks"):
        M.label_map(masks, scores=[1, 2])


def test_label_map_uint16_and_png_round_trip(tmp_path):
    masks = np.zeros((300, 20, 20), bool)
    for k in range(300):
        masks[k].flat[k] = True
    labels = M.label_map(masks)
    assert labels.dtype == np.uint16 and labels.flat[299] == 300
    path = tmp_path / "labels.png"
    M.save_label_map_png(path, labels)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(img), labels)

    small = M.label_map(masks[:3])
    M.save_label_map_png(path, small)
    with Image.open(path) as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), small)
    assert M.label_map(np.zeros((0, 4, 5), bool)).shape == (4, 5)
    with pytest.raises(ValueError, match="0..65535"):
        M.save_label_map_png(path, np.full((2, 2), 70000, np.int64))


# ------------------------------------------------------------------------------- overlays


def test_overlay_draws_masks_points_and_boxes(tmp_path):
    image = np.full((100, 120, 3), 100, np.uint8)
    before = image.copy()
    m1 = np.zeros((100, 120), bool)
    m1[10:60, 10:60] = True
    m2 = np.zeros((100, 120), bool)
    m2[20:40, 70:110] = True
    out = M.overlay(
        image,
        [m1, m2],
        colors=[(255, 0, 0), (0, 0, 255)],
        alpha=0.5,
        points=[[90, 80], [20, 85]],
        point_labels=[1, 0],
        boxes=[[65, 15, 115, 45]],
    )
    np.testing.assert_array_equal(image, before)  # input untouched
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[35, 35].tolist() == [178, 50, 50]  # 50 % red over gray 100
    assert out[30, 90].tolist() == [50, 50, 178]
    assert out[10, 30].tolist() == [255, 0, 0]  # contour in the mask colour
    assert out[95, 5].tolist() == [100, 100, 100]  # untouched background
    g = out[80, 90].astype(int)
    assert g[1] > 150 and g[0] < 60  # positive point: green
    r = out[85, 20].astype(int)
    assert r[0] > 150 and r[1] < 60  # negative point: red
    assert out[15, 90].tolist() == [30, 144, 255]  # box edge

    plain = M.overlay(image, [m1, m2], draw_contours=False)
    np.testing.assert_array_equal(plain, M.overlay(image, [m1, m2], draw_contours=False))
    assert not np.array_equal(plain[35, 35], plain[30, 90])  # distinct default colours
    assert M.overlay(image, []).tolist() == image.tolist()

    path = tmp_path / "ov.png"
    M.save_overlay_png(path, image, [m1, m2], alpha=0.3)
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(img), M.overlay(image, [m1, m2], alpha=0.3))
    with pytest.raises(ValueError, match="masks are"):
        M.overlay(image, [np.zeros((5, 5), bool)])


def test_palette_is_deterministic_and_distinct():
    p = M.palette(24)
    np.testing.assert_array_equal(p, M.palette(24))
    d = np.abs(p[:, None].astype(int) - p[None].astype(int)).sum(-1)
    assert d[~np.eye(24, dtype=bool)].min() > 20


# ------------------------------------------------------------------------------ COCO JSON


def _coco_inputs() -> tuple[list[dict], list[list[dict]], list[list[np.ndarray]]]:
    ring, _ = ring_mask(60, 70)
    a = [ring, blobs(60, 70, 1, sigma=3, fill=0.2)]
    b = [blobs(40, 50, 2, sigma=2, fill=0.3), disk(40, 50, 20, 25, 6), disk(40, 50, 5, 5, 3)]
    images = [{"file_name": "a.jpg", "height": 60, "width": 70}, {"file_name": "b.png", "id": 7}]
    anns = [
        [
            {"segmentation": a[0], "predicted_iou": np.float32(0.9), "point_coords": [[1.0, 2.0]]},
            {"segmentation": M.encode_rle(a[1]), "stability_score": 0.8, "area": -1},
        ],
        [
            {"segmentation": M.mask_to_uncompressed_rle(b[0]), "category_id": 2},
            {"segmentation": b[1].astype(np.uint8), "crop_box": np.array([0, 0, 50, 40])},
            {"segmentation": b[2]},
        ],
    ]
    return images, anns, [a, b]


@pytest.mark.parametrize("mode", ["rle", "polygon"])
def test_coco_json_loads_in_pycocotools(tmp_path, mode):
    images, anns, source = _coco_inputs()
    cats = [{"id": 1, "name": "object"}, {"id": 2, "name": "thing"}]
    data = M.coco_json(images, anns, mode=mode, categories=cats)
    path = tmp_path / "coco.json"
    M.save_coco_json(path, data)
    coco = COCO(str(path))

    assert sorted(coco.getImgIds()) == [1, 7]
    assert coco.imgs[7]["height"] == 40 and coco.imgs[7]["width"] == 50
    flat = [(img_id, m) for img_id, ms in zip([1, 7], source) for m in ms]
    ann_ids = coco.getAnnIds()
    assert ann_ids == list(range(1, len(flat) + 1))
    for ann_id, (img_id, mask) in zip(ann_ids, flat):
        ann = coco.anns[ann_id]
        assert ann["image_id"] == img_id and ann["iscrowd"] == 0
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask.astype(bool))
        assert ann["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        if mode == "polygon":
            assert isinstance(ann["segmentation"], list)
        else:
            assert isinstance(ann["segmentation"]["counts"], str)
    assert coco.anns[1]["predicted_iou"] == pytest.approx(0.9)
    assert coco.anns[1]["point_coords"] == [[1.0, 2.0]]
    assert coco.anns[2]["stability_score"] == 0.8
    assert coco.anns[3]["category_id"] == 2 and coco.anns[4]["category_id"] == 1
    assert coco.anns[4]["crop_box"] == [0, 0, 50, 40]


def test_coco_json_defaults_and_refusals():
    images, anns, _ = _coco_inputs()
    plain = [[{k: v for k, v in a.items() if k != "category_id"} for a in al] for al in anns]
    data = M.coco_json(images, plain)
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert {"info", "images", "annotations", "categories"} <= set(data)
    json.dumps(data)
    with pytest.raises(ValueError, match="category_id 2"):
        M.coco_json(images, anns, categories=[{"id": 1, "name": "object"}])
    bad = [{"file_name": "a.jpg", "height": 61, "width": 70}, images[1]]
    with pytest.raises(ValueError, match="60 x 70 but the image is 61 x 70"):
        M.coco_json(bad, anns, categories=[{"id": 1, "name": "o"}, {"id": 2, "name": "t"}])
    with pytest.raises(ValueError, match="2 images but 1 annotation lists"):
        M.coco_json(images, anns[:1])
    with pytest.raises(ValueError, match="height"):
        M.coco_json([{"file_name": "x.jpg"}], [[]])


# ------------------------------------------------------------------------- atomic writes


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), M.atomic_write(target, "w") as f:
        f.write('{"partial": ')
        raise RuntimeError("writer died")
    assert _leftovers(tmp_path) == []

    target.write_text("old")
    with pytest.raises(RuntimeError), M.atomic_write(target) as f:
        f.write(b"new but incomplete")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == ["out.json"]

    with M.atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == ["out.json"]


def test_atomic_write_gives_new_files_normal_permissions(tmp_path):
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # created by open(): 0o666 & ~umask
    with M.atomic_write(tmp_path / "atomic.txt", "w") as f:
        f.write("x")
    assert os.stat(tmp_path / "atomic.txt").st_mode == os.stat(reference).st_mode


def test_save_mask_png_and_failed_save(tmp_path, monkeypatch):
    mask, _ = ring_mask()
    path = tmp_path / "mask.png"
    M.save_mask_png(path, mask)
    with Image.open(path) as img:
        assert img.mode == "L"
        arr = np.asarray(img)
    assert set(np.unique(arr)) == {0, 255}
    np.testing.assert_array_equal(arr == 255, mask)

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        M.save_mask_png(tmp_path / "other.png", mask)
    assert _leftovers(tmp_path) == ["mask.png"]
