"""segany.evaluate: the click protocol, the evaluation loop, reports and the GrabCut baseline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from segany.evaluate import (
    GrabCutPredictor,
    _from_low_res,
    _to_low_res,
    evaluate_interactive,
    mask_iou,
    next_click,
    noc,
    plot_miou_curve,
    save_report,
)


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# --------------------------------------------------------------------------- next_click
def test_first_click_at_square_centre() -> None:
    gt = _rect(21, 21, 5, 16, 5, 16)  # 11 x 11 square, centre (10, 10)
    assert next_click(gt, np.zeros_like(gt)) == (10, 10, True)


def test_image_border_counts_as_boundary() -> None:
    # Without the 1-px padding the whole-image object would have no boundary at all.
    gt = np.ones((9, 13), dtype=bool)
    # Row 4 is 5 from the top and bottom borders; columns 4..8 tie, the first wins.
    assert next_click(gt, np.zeros_like(gt)) == (4, 4, True)
    # An object touching the left border: its centre is pushed right, away from the border.
    gt = _rect(15, 20, 2, 13, 0, 11)  # 11 x 11 at the left edge
    assert next_click(gt, np.zeros_like(gt)) == (7, 5, True)


def test_positive_or_negative_by_larger_region() -> None:
    gt = _rect(30, 30, 2, 7, 2, 7)  # 5 x 5 object, all missed
    pred = _rect(30, 30, 10, 29, 10, 29)  # 19 x 19 false positive
    y, x, positive = next_click(gt, pred)
    assert not positive and (y, x) == (19, 19)
    # Now the false negative region is the larger one.
    gt2 = _rect(30, 30, 10, 29, 10, 29)
    pred2 = _rect(30, 30, 2, 7, 2, 7)
    assert next_click(gt2, pred2) == (19, 19, True)


def test_equal_regions_give_a_negative_click() -> None:
    # max dist(FN) > max dist(FP) is strict: a tie is a negative click.
    gt = _rect(20, 30, 2, 9, 2, 9)
    pred = _rect(20, 30, 2, 9, 20, 27)
    assert next_click(gt, pred) == (5, 23, False)


def test_ignore_pixels_are_not_errors() -> None:
    gt = _rect(30, 30, 2, 27, 2, 27)  # large miss
    pred = gt.copy()
    pred[:, :] = False
    pred[0:3, 27:30] = True  # small false positive outside gt
    ignore = gt.copy()  # ... but the miss is ignored
    y, x, positive = next_click(gt, pred, ignore=ignore)
    assert not positive and pred[y, x]
    # Without ignore the miss wins.
    assert next_click(gt, pred)[2] is True


def test_ties_go_to_first_pixel_in_row_major_order() -> None:
    gt = _rect(10, 10, 2, 6, 2, 6)  # 4 x 4: pixels (3,3) (3,4) (4,3) (4,4) all at distance 2
    assert next_click(gt, np.zeros_like(gt)) == (3, 3, True)
    # Two identical squares side by side: the left one comes first in its row.
    gt = _rect(12, 30, 2, 9, 2, 9) | _rect(12, 30, 2, 9, 18, 25)
    assert next_click(gt, np.zeros_like(gt)) == (5, 5, True)
    # ... and when the right one sits higher, its centre row comes first.
    gt = _rect(12, 30, 3, 10, 2, 9) | _rect(12, 30, 2, 9, 18, 25)
    assert next_click(gt, np.zeros_like(gt)) == (5, 21, True)


def test_clicked_pixels_are_excluded() -> None:
    gt = _rect(21, 21, 5, 16, 5, 16)
    empty = np.zeros_like(gt)
    # Centre (10, 10) has distance 6; next best is 5, first in row-major order at (9, 9).
    assert next_click(gt, empty, clicked=[(10, 10)]) == (9, 9, True)
    clicked = np.zeros_like(gt)
    clicked[10, 10] = True
    assert next_click(gt, empty, clicked=clicked) == (9, 9, True)
    assert next_click(gt, gt) is None  # perfect prediction: nothing to click
    one = np.zeros_like(gt)
    one[3, 3] = True
    assert next_click(one, empty, clicked=[(3, 3)]) is None


def _brute_force_click(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, bool]:
    """The protocol written out directly: exact squared distances to the nearest pixel outside
    the region in the 1-px zero-padded grid."""

    def dist2(region: np.ndarray) -> np.ndarray:
        padded = np.pad(region, 1)
        outside = np.argwhere(~padded)
        out = np.zeros(region.shape, dtype=np.int64)
        for y, x in np.argwhere(region):
            d = ((outside - (y + 1, x + 1)) ** 2).sum(axis=1)
            out[y, x] = d.min()
        return out

    fn, fp = dist2(gt & ~pred), dist2(~gt & pred)
    positive = fn.max() > fp.max()
    d = fn if positive else fp
    y, x = divmod(int(np.argmax(d)), gt.shape[1])
    return y, x, bool(positive)


# Seeds 7, 9, 13, 29 and 86 give other clicks with 3x3 or 5x5 chamfer distances.
@pytest.mark.parametrize("seed", [0, 1, 7, 9, 13, 29, 86])
def test_next_click_matches_exact_euclidean_brute_force(seed: int) -> None:
    # Irregular blobs, where chamfer (approximate) distances pick other pixels.
    rng = np.random.default_rng(seed)
    h, w = 26, 31
    gt = np.zeros((h, w), dtype=bool)
    pred = np.zeros((h, w), dtype=bool)
    for target in (gt, gt, pred, pred):
        target |= _disk(h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 9))
    assert next_click(gt, pred) == _brute_force_click(gt, pred)


def test_mask_iou_and_noc() -> None:
    a = _rect(10, 10, 0, 5, 0, 10)
    b = _rect(10, 10, 0, 10, 0, 5)
    assert mask_iou(a, b) == pytest.approx(25 / 75)
    assert mask_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert mask_iou(a, b, ignore=a ^ b) == 1.0
    assert noc([0.5, 0.86, 0.95], 0.85, 20) == 2
    assert noc([0.5, 0.86, 0.95], 0.9, 20) == 3
    assert noc([0.5, 0.6], 0.9, 20) == 20


# --------------------------------------------------------------------------- evaluation loop
def _logits(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 8.0, -8.0).astype(np.float32)


class OraclePredictor:
    """Returns the ground truth of the current image (looked up by its pixels)."""

    def __init__(self, gts: dict[bytes, np.ndarray]) -> None:
        self.gts = gts
        self.gt: np.ndarray | None = None
        self.boxes: list[np.ndarray] = []
        self.calls = 0

    def set_image(self, image: np.ndarray) -> None:
        self.gt = self.gts[image.tobytes()]

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output=True, return_logits=False):  # fmt: skip
        self.calls += 1
        assert self.gt is not None
        n = 3 if multimask_output else 1
        if box is not None:
            self.boxes.append(np.asarray(box))
            x0, y0, x1, y1 = (int(v) for v in box)
            m = np.zeros_like(self.gt)
            m[y0 : y1 + 1, x0 : x1 + 1] = True
        else:
            m = self.gt
        return np.repeat(_logits(m)[None], n, 0), np.ones(n), np.zeros((n, 256, 256))


def _instances(n: int, h: int = 40, w: int = 50) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        gt = _disk(h, w, rng.uniform(12, h - 12), rng.uniform(12, w - 12), rng.uniform(5, 10))
        out.append((f"inst{i}", image, gt))
    return out


def test_oracle_takes_one_click() -> None:
    items = _instances(3)
    oracle = OraclePredictor({img.tobytes(): gt for _, img, gt in items})
    report = evaluate_interactive(oracle, items, max_clicks=6, progress=False)
    assert report["n_instances"] == 3
    assert report["noc"] == {"85": 1.0, "90": 1.0}
    assert report["nof"] == {"85": 0, "90": 0}
    assert report["miou_at"] == [1.0] * 6
    assert report["clicks_obeyed_at"] == [1.0] * 6
    assert [r["name"] for r in report["per_instance"]] == ["inst0", "inst1", "inst2"]
    # After a perfect first click no further click can be placed: one box + one click each.
    assert oracle.calls == 6
    for rec in report["per_instance"]:
        assert len(rec["clicks"]) == 1 and rec["clicks"][0][2] == 1


def test_empty_predictor_fails_everything() -> None:
    class Empty:
        def set_image(self, image):
            self.hw = image.shape[:2]

        def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                    multimask_output=True, return_logits=False):  # fmt: skip
            n = 3 if multimask_output else 1
            return np.full((n, *self.hw), -5.0), np.ones(n), np.full((n, 256, 256), -5.0)

    items = _instances(4)
    report = evaluate_interactive(Empty(), items, max_clicks=5, progress=False)
    assert report["noc"] == {"85": 5.0, "90": 5.0}
    assert report["nof"] == {"85": 4, "90": 4}
    assert report["miou_at"] == [0.0] * 5
    assert report["clicks_obeyed_at"] == [0.0] * 5  # every click positive, none followed
    assert report["box_miou"] == 0.0
    # Every click lands on the missed object: all positive, all different pixels.
    for rec in report["per_instance"]:
        assert all(c[2] == 1 for c in rec["clicks"])
        assert len({(c[0], c[1]) for c in rec["clicks"]}) == 5


class SteppedPredictor:
    """After k clicks returns the first 11 * k object pixels (row-major): IoU = 0.055 k on a
    200-pixel object. Click 1 offers three candidates; only the best-scored one is right."""

    def __init__(self, gt: np.ndarray) -> None:
        assert gt.sum() == 200
        self.gt = gt
        self.log: list[dict[str, Any]] = []

    def set_image(self, image):
        pass

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output=True, return_logits=False):  # fmt: skip
        k = 0 if point_coords is None else len(point_coords)
        self.log.append(
            {
                "k": k,
                "multimask": multimask_output,
                "mask_input": None if mask_input is None else np.array(mask_input),
                "labels": None if point_labels is None else list(point_labels),
            }
        )
        flat = np.zeros(self.gt.size, dtype=bool)
        flat[np.flatnonzero(self.gt)[: 11 * k]] = True
        m = flat.reshape(self.gt.shape)
        low = np.full((1, 256, 256), float(k), dtype=np.float32)  # marks which call it was
        if multimask_output:
            wrong = _logits(~m)
            masks = np.stack([wrong, _logits(m), wrong])
            return masks, np.array([0.2, 0.9, 0.5]), np.concatenate([low - 100, low, low - 100])
        return _logits(m)[None], np.array([0.5]), low


def test_stepped_predictor_gives_expected_noc_and_protocol_calls() -> None:
    gt = _rect(30, 40, 5, 15, 10, 30)  # 10 x 20 = 200 pixels
    items = [("a", np.zeros((30, 40, 3), np.uint8), gt)]
    pred = SteppedPredictor(gt)
    report = evaluate_interactive(pred, items, max_clicks=20, box=False, progress=False)
    # IoU_k = 0.055 k: first >= 0.85 at k = 16 (0.88), first >= 0.90 at k = 17 (0.935).
    assert report["noc"] == {"85": 16.0, "90": 17.0}
    assert report["nof"] == {"85": 0, "90": 0}
    assert report["miou_at"][:18] == pytest.approx([0.055 * k for k in range(1, 19)])
    assert report["box_miou"] is None
    log = pred.log
    assert len(log) == 19  # k = 19 reaches 209 >= 200 pixels: perfect, then no more clicks
    assert log[0]["multimask"] and log[0]["mask_input"] is None and log[0]["k"] == 1
    for i, call in enumerate(log[1:], 2):
        assert call["k"] == i and not call["multimask"]
        # The previous call's low-res logits of the chosen candidate are fed back.
        assert call["mask_input"].shape == (1, 256, 256)
        assert np.all(call["mask_input"] == i - 1)
        assert call["labels"] == [1] * i  # the prediction never leaves the object
    assert report["per_instance"][0]["noc"] == {"85": 16, "90": 17}


def test_single_mask_first_click_and_no_feedback() -> None:
    gt = _rect(30, 40, 5, 15, 10, 30)
    pred = SteppedPredictor(gt)
    evaluate_interactive(
        pred,
        [("a", np.zeros((30, 40, 3), np.uint8), gt)],
        max_clicks=3,
        box=False,
        first_click_multimask=False,
        feed_back_logits=False,
        progress=False,
    )
    assert [c["multimask"] for c in pred.log] == [False, False, False]
    assert all(c["mask_input"] is None for c in pred.log)


def test_probability_threshold_is_049() -> None:
    class Fixed:
        def __init__(self, inside: float, outside: float) -> None:
            self.inside, self.outside = inside, outside

        def set_image(self, image):
            pass

        def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                    multimask_output=True, return_logits=False):  # fmt: skip
            assert return_logits
            n = 3 if multimask_output else 1
            m = np.where(gt, self.inside, self.outside)[None].repeat(n, 0)
            return m, np.ones(n), np.zeros((n, 256, 256))

    gt = _rect(20, 20, 5, 15, 5, 15)
    items = [("a", np.zeros((20, 20, 3), np.uint8), gt)]
    # sigmoid(0) = 0.5 > 0.49 is object; sigmoid(-0.1) = 0.475 is not.
    r = evaluate_interactive(Fixed(0.0, -0.1), items, max_clicks=2, progress=False)
    assert r["miou_at"][0] == 1.0
    # sigmoid(-0.03) = 0.4925 > 0.49: the background counts as object too.
    r = evaluate_interactive(Fixed(0.0, -0.03), items, max_clicks=1, progress=False)
    assert r["miou_at"][0] == pytest.approx(100 / 400)


def test_box_prompt_convention_and_iou() -> None:
    gt = _disk(40, 50, 20, 24, 9)
    items = [("d", np.full((40, 50, 3), 7, np.uint8), gt)]
    oracle = OraclePredictor({items[0][1].tobytes(): gt})
    report = evaluate_interactive(oracle, items, max_clicks=1, progress=False)
    # Tight box with inclusive max column / row.
    assert oracle.boxes[0].tolist() == [15, 11, 33, 29]
    # The oracle fills the box, so box IoU is the disk's share of the 19 x 19 box.
    assert report["box_miou"] == pytest.approx(gt.sum() / 19**2)
    assert report["per_instance"][0]["box_iou"] == report["box_miou"]


def test_dataset_input_report_json_and_plot(tmp_path: Path) -> None:
    from segany.data import ManifestDataset

    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "masks").mkdir()
    lines = []
    gts = {}
    for i, (_, image, gt) in enumerate(_instances(2)):
        Image.fromarray(image).save(tmp_path / "set" / "images" / f"{i}.png")
        Image.fromarray(gt).save(tmp_path / "set" / "masks" / f"{i}_00.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "mask": f"masks/{i}_00.png"}))
        gts[image.tobytes()] = gt
    (tmp_path / "set" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    ds = ManifestDataset(tmp_path / "set")
    report = evaluate_interactive(OraclePredictor(gts), ds, max_clicks=3, limit=1, progress=False)
    assert report["n_instances"] == 1 and report["per_instance"][0]["name"] == "0_00"
    assert report["settings"]["limit"] == 1
    report2 = evaluate_interactive(OraclePredictor(gts), list(ds), max_clicks=3, progress=False)
    assert report2["n_instances"] == 2  # plain MaskSamples work as well

    json.dumps(report, allow_nan=False)  # serialisable as is
    path = tmp_path / "out" / "report.json"
    path.parent.mkdir()
    save_report(path, report)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left

    pytest.importorskip("matplotlib")
    worse = dict(report, miou_at=[0.2, 0.5, 0.7], noc={"85": 3.0, "90": 3.0})
    png = tmp_path / "curve.png"
    plot_miou_curve({"oracle": report, "worse": worse}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_miou_curve({}, png)


def test_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_miou_curve({"a": {"miou_at": [0.5]}}, tmp_path / "x.png")


def test_bad_arguments_and_outputs() -> None:
    items = _instances(1)
    oracle = OraclePredictor({img.tobytes(): gt for _, img, gt in items})
    with pytest.raises(ValueError, match="max_clicks"):
        evaluate_interactive(oracle, items, max_clicks=0, progress=False)
    with pytest.raises(ValueError, match="thresholds"):
        evaluate_interactive(oracle, items, thresholds=(85,), progress=False)
    empty_gt = [("e", items[0][1], np.zeros(items[0][2].shape, bool))]
    with pytest.raises(ValueError, match="e: ground truth is empty"):
        evaluate_interactive(oracle, empty_gt, progress=False)
    with pytest.raises(ValueError, match="item 0"):
        evaluate_interactive(oracle, [object()], progress=False)

    class WrongShape(OraclePredictor):
        def predict(self, **kwargs):
            masks, scores, low = super().predict(**kwargs)
            return masks[:, :-1], scores, low

    with pytest.raises(ValueError, match="masks of shape"):
        evaluate_interactive(WrongShape(oracle.gts), items, progress=False)


# --------------------------------------------------------------------------- GrabCut
def _two_colour(h: int = 72, w: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = _disk(h, w, 34, 52, 20) | _rect(h, w, 30, 40, 20, 52)  # a blob with a "handle"
    image = np.where(gt[..., None], [200, 60, 50], [40, 120, 60]).astype(np.float64)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), gt


def test_grabcut_segments_a_clear_object() -> None:
    image, gt = _two_colour()
    report = evaluate_interactive(
        GrabCutPredictor(), [("blob", image, gt)], max_clicks=3, progress=False
    )
    assert report["miou_at"][0] > 0.9
    assert max(report["miou_at"]) > 0.95
    assert report["box_miou"] > 0.9


@pytest.mark.parametrize("from_previous", [False, True])
def test_grabcut_outputs_and_feedback(from_previous) -> None:
    image, gt = _two_colour(48, 64, seed=1)
    p = GrabCutPredictor(iterations=2, from_previous=from_previous)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(point_coords=[[10, 10]], point_labels=[1])
    p.set_image(image)
    masks, scores, low = p.predict(
        point_coords=[[52.0, 34.0]], point_labels=[1], multimask_output=True
    )
    assert masks.shape == (3, 48, 64) and masks.dtype == bool
    assert scores.tolist() == [1.0, 1.0, 1.0] and low.shape == (3, 256, 256)
    logits, _, low1 = p.predict(
        point_coords=[[52.0, 34.0]], point_labels=[1], multimask_output=False, return_logits=True
    )
    assert logits.shape == (1, 48, 64) and set(np.unique(logits)) <= {-10.0, 10.0}
    # Deterministic: the same prompt gives the same mask.
    assert np.array_equal(logits[0] > 0, masks[0])
    # A negative click inside the current mask removes at least its seed disk.
    x, y = 40, 34
    assert masks[0][y, x]
    refined, _, _ = p.predict(
        point_coords=[[52.0, 34.0], [x, y]],
        point_labels=[1, 0],
        mask_input=low1,
        multimask_output=False,
    )
    assert not refined[0][y - 5 : y + 6, x].any()
    # Only negative clicks: nothing can be foreground, and no OpenCV error.
    p.set_image(image)
    none, _, _ = p.predict(point_coords=[[3, 3]], point_labels=[0], multimask_output=False)
    assert not none.any()
    with pytest.raises(ValueError, match="mask_input"):
        p.predict(point_coords=[[3, 3]], point_labels=[1], mask_input=np.zeros((1, 64, 64)))
    # The previous mask seeds the next round only when asked: an all-object mask_input
    # with no positive click keeps everything foreground-probable only then.
    p.set_image(image)
    full = np.full((1, 256, 256), 10.0, dtype=np.float32)
    got, _, _ = p.predict(
        point_coords=[[3, 3]], point_labels=[0], mask_input=full, multimask_output=False
    )
    assert got[0].any() == from_previous


def test_low_res_round_trip() -> None:
    mask = _disk(90, 160, 45, 80, 30)
    logits = np.where(mask, 10.0, -10.0).astype(np.float32)
    low = _to_low_res(logits, -10.0)
    assert low.shape == (256, 256)
    # Longest side 160 -> 256, so 90 -> 144 rows are valid and the rest is padding.
    assert np.all(low[144:] == -10.0)
    back = _from_low_res(low, (90, 160)) > 0
    assert mask_iou(back, mask) > 0.97
