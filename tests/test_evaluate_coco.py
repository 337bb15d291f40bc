"""segany.evaluate_coco: COCO mask AP / AR of "segment everything" and of box prompts."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, make_pair
from PIL import Image

from segany.data import CocoDataset, ManifestDataset
from segany.evaluate_coco import (
    CocoMaskEvaluator,
    ImageTargets,
    evaluate_box_prompted,
    evaluate_everything,
    iter_image_targets,
)
from segany.masks import encode_rle

H, W = 120, 160


def _rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _disk(cy: float, cx: float, r: float, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (H, W, 3), dtype=np.uint8)


def _scenes() -> list[tuple[str, np.ndarray, list[np.ndarray], list[bool]]]:
    """Two images; objects of every COCO size (small < 32², medium, large > 96²) and a crowd."""
    a = [
        _rect(10, 30, 10, 30),  # 400 px: small
        _rect(40, 90, 20, 80),  # 3000 px: medium
        _disk(60, 120, 12),  # ~450 px: small
        _rect(95, 115, 100, 150),  # crowd region
    ]
    b = [
        _rect(5, 115, 10, 120),  # 12100 px: large
        _disk(30, 140, 10),
    ]
    return [("a", _image(0), a, [False, False, False, True]), ("b", _image(1), b, [False, False])]


def _write_manifest(root: Path, scenes: Any, crowd_field: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for name, image, masks, crowd in scenes:
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        for k, (m, c) in enumerate(zip(masks, crowd)):
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / f"{name}_{k}.png")
            rec: dict[str, Any] = {"image": f"images/{name}.png", "mask": f"masks/{name}_{k}.png"}
            if crowd_field:
                rec["iscrowd"] = int(c)
            rec["category"] = "thing" if k % 2 else "stuff"  # categories are not used
            lines.append(json.dumps(rec))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    return _write_manifest(tmp_path / "data", _scenes())


class FakeGenerator:
    """Returns, for each known image, the given masks as records (binary_mask output)."""

    def __init__(self, outputs: dict[bytes, list[tuple[np.ndarray, float, float]]]) -> None:
        self.outputs = outputs

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"segmentation": m, "predicted_iou": iou, "stability_score": stab}
            for m, iou, stab in self.outputs[image.tobytes()]
        ]


def _gt_generator(transform=lambda m: m, iou: float = 0.9) -> FakeGenerator:
    out = {}
    for _, image, masks, crowd in _scenes():
        out[image.tobytes()] = [(transform(m), iou, 0.95) for m, c in zip(masks, crowd) if not c]
    return FakeGenerator(out)


# --------------------------------------------------------------------------- everything
def test_exact_ground_truth_gives_ap_1(manifest: Path) -> None:
    report = evaluate_everything(_gt_generator(), ManifestDataset(manifest), progress=False)
    m = report["metrics"]
    for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
        assert m[key] == pytest.approx(1.0), key
    assert m["AR@1"] == pytest.approx(0.4)  # one object per image: 2 of 5
    for key in ("AR@10", "AR@100", "AR@1000", "AR_small@1000", "AR_large@1000"):
        assert m[key] == pytest.approx(1.0), key
    assert report["n_images"] == 2 and report["n_gt"] == 5 and report["n_crowd"] == 1
    assert report["n_predictions"] == 5 and report["predictions_per_image"] == 2.5
    assert [r["name"] for r in report["per_image"]] == ["a", "b"]
    assert report["settings"]["max_dets"] == [1, 10, 100, 1000]
    json.dumps(report)  # JSON-serialisable as it is


def test_no_masks_give_ap_0_and_ar_0(manifest: Path) -> None:
    empty = FakeGenerator({img.tobytes(): [] for _, img, _, _ in _scenes()})
    m = evaluate_everything(empty, ManifestDataset(manifest), progress=False)["metrics"]
    assert m["AP"] == 0.0 and m["AP50"] == 0.0
    assert all(m[f"AR@{k}"] == 0.0 for k in (1, 10, 100, 1000))


def test_shifted_mask_gives_the_fraction_of_thresholds_it_passes() -> None:
    # A 20 x 20 square shifted 2 px: IoU 360 / 440 = 0.818, a match at the IoU thresholds
    # 0.50 ... 0.80 (7 of 10) with precision 1, so AP = AR = 0.7, AP50 = AP75 = 1.
    gt = _rect(40, 60, 40, 60)
    image = _image(3)
    shifted = np.roll(gt, 2, axis=1)
    gen = FakeGenerator({image.tobytes(): [(shifted, 0.9, 0.9)]})
    m = evaluate_everything(gen, [("sq", image, [gt])], progress=False)["metrics"]
    assert m["AP"] == pytest.approx(0.7)
    assert m["AR@1"] == pytest.approx(0.7)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["AP_medium"] is None and m["AP_large"] is None  # no ground truth of that size


def test_larger_shifts_give_lower_ap(manifest: Path) -> None:
    ds = ManifestDataset(manifest)
    aps = [
        evaluate_everything(
            _gt_generator(lambda m, s=s: np.roll(m, s, axis=1)), ds, progress=False
        )["metrics"]["AP"]
        for s in (0, 1, 3, 6)
    ]
    assert aps[0] == pytest.approx(1.0)
    assert aps == sorted(aps, reverse=True) and aps[1] > aps[2] > aps[3]
    assert 0.0 < aps[3] < 1.0


def test_score_ranks_predictions() -> None:
    # A perfect mask and a junk one. Junk ranked first: precision 1/2 at recall 1, AP = 0.5;
    # ranked last, AP = 1. predicted_iou favours the junk, stability_score the perfect mask.
    gt = _disk(60, 80, 20)
    junk = _rect(0, 10, 0, 10)
    image = _image(4)
    gen = FakeGenerator({image.tobytes(): [(gt, 0.8, 0.99), (junk, 0.95, 0.5)]})
    data = [("d", image, [gt])]
    by_iou = evaluate_everything(gen, data, progress=False)
    assert by_iou["metrics"]["AP"] == pytest.approx(0.5)
    by_stability = evaluate_everything(gen, data, score="stability_score", progress=False)
    assert by_stability["metrics"]["AP"] == pytest.approx(1.0)
    product = evaluate_everything(gen, data, score="product", progress=False)  # 0.79 vs 0.475
    assert product["metrics"]["AP"] == pytest.approx(1.0)
    assert by_iou["metrics"]["AR@100"] == pytest.approx(1.0)


def test_crowd_regions_are_ignored(tmp_path: Path) -> None:
    # A prediction inside the crowd region: not a false positive, even ranked first.
    scenes = _scenes()
    crowd_mask = scenes[0][2][3]
    part = crowd_mask & _rect(0, H, 100, 125)  # half the crowd region: IoU with it 0.5
    outputs = {}
    for _, image, masks, crowd in scenes:
        outputs[image.tobytes()] = [(m, 0.9, 0.95) for m, c in zip(masks, crowd) if not c]
    outputs[scenes[0][1].tobytes()].append((part, 0.99, 0.99))
    gen = FakeGenerator(outputs)

    with_crowd = _write_manifest(tmp_path / "crowd", scenes)
    m = evaluate_everything(gen, ManifestDataset(with_crowd), progress=False)["metrics"]
    assert m["AP"] == pytest.approx(1.0) and m["AR@100"] == pytest.approx(1.0)

    # The same region as an object: missed (IoU 0.5 < most thresholds) and a high-scoring
    # false positive, so both AP and AR fall.
    as_object = [(n, i, ms, [False] * len(ms)) for n, i, ms, _ in scenes]
    ds = ManifestDataset(_write_manifest(tmp_path / "object", as_object))
    m2 = evaluate_everything(gen, ds, progress=False)["metrics"]
    assert m2["AP"] < 0.95 and m2["AR@100"] < 1.0

    # A dataset that knows nothing of the region: the prediction is a false positive.
    dropped = [(n, i, ms[:3], c[:3]) if n == "a" else (n, i, ms, c) for n, i, ms, c in scenes]
    ds = ManifestDataset(_write_manifest(tmp_path / "dropped", dropped))
    m3 = evaluate_everything(gen, ds, progress=False)["metrics"]
    assert m3["AP"] < 1.0 and m3["AR@100"] == pytest.approx(1.0)


def test_ignore_pixels_are_a_crowd_region() -> None:
    gt = _rect(10, 40, 10, 40)
    ignore = _rect(60, 110, 60, 150)
    image = _image(5)
    inside = _rect(70, 100, 70, 120)  # entirely in the ignore pixels
    gen = FakeGenerator({image.tobytes(): [(gt, 0.8, 0.9), (inside, 0.99, 0.99)]})
    with_ignore = [ImageTargets("i", image, [gt], [False], ignore=ignore)]
    report = evaluate_everything(gen, with_ignore, progress=False)
    assert report["metrics"]["AP"] == pytest.approx(1.0)
    assert report["n_gt"] == 1 and report["n_crowd"] == 1
    without = [ImageTargets("i", image, [gt], [False])]
    assert evaluate_everything(gen, without, progress=False)["metrics"]["AP"] == pytest.approx(0.5)


def test_coco_json_with_crowd_annotation(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    image = _image(6)
    Image.fromarray(image).save(tmp_path / "im.png")
    obj = _rect(10, 50, 10, 60)
    crowd = _rect(60, 110, 80, 150)
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))
    data = {
        "images": [{"id": 7, "file_name": "im.png", "height": H, "width": W}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 2,
                "segmentation": {"size": [H, W], "counts": crowd_rle["counts"].decode()},
                "iscrowd": 1,
            },
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path, include_crowd=True)
    (target,) = list(iter_image_targets(ds))
    assert target.iscrowd == [False, True] and target.name == "7"
    part = crowd & _rect(0, H, 80, 110)
    gen = FakeGenerator({image.tobytes(): [(obj, 0.5, 0.5), (part, 0.9, 0.9)]})
    report = evaluate_everything(gen, ds, progress=False)
    assert report["metrics"]["AP"] == pytest.approx(1.0)
    assert report["n_gt"] == 1 and report["n_crowd"] == 1


def test_dataset_grouping_limit_and_empty_masks(tmp_path: Path, caplog) -> None:
    scenes = _scenes()
    scenes[1][2].append(np.zeros((H, W), dtype=bool))  # an empty mask: skipped, warned
    scenes[1][3].append(False)
    ds = ManifestDataset(_write_manifest(tmp_path / "d", scenes))
    targets = list(iter_image_targets(ds))
    assert [t.name for t in targets] == ["a", "b"]
    assert [len(t.masks) for t in targets] == [4, 2] and targets[0].iscrowd[3]
    assert "empty mask" in caplog.text
    assert np.array_equal(targets[0].image, scenes[0][1])
    assert [t.name for t in iter_image_targets(ds, limit=1)] == ["a"]
    report = evaluate_everything(_gt_generator(), ds, limit=1, progress=False)
    assert report["n_images"] == 1 and report["settings"]["limit"] == 1


def test_metrics_read_as_cocoeval_summarize() -> None:
    # Predictions of mixed quality; the figures must equal COCOeval.summarize()'s stats.
    rng = np.random.default_rng(0)
    ev = CocoMaskEvaluator((1, 10, 100))
    for _, image, masks, crowd in _scenes():
        preds, scores = [], []
        for m in masks:
            preds.append(np.roll(m, int(rng.integers(0, 5)), axis=int(rng.integers(0, 2))))
            scores.append(float(rng.random()))
        preds.append(_rect(0, 30, 0, 40))
        scores.append(0.5)
        ev.add_image(image.shape[:2], masks, crowd, [encode_rle(p) for p in preds], scores)
    m = ev.summarize()
    with contextlib.redirect_stdout(io.StringIO()):
        ev.cocoeval.summarize()
    stats = [v if v != -1 else None for v in ev.cocoeval.stats]
    keys = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR@1", "AR@10"]
    keys += ["AR@100", "AR_small@100", "AR_medium@100", "AR_large@100"]
    for key, stat in zip(keys, stats):
        assert m[key] == pytest.approx(stat), key
    assert 0.0 < m["AP"] < 1.0


def test_bad_arguments(manifest: Path) -> None:
    ds = ManifestDataset(manifest)
    with pytest.raises(ValueError, match="score"):
        evaluate_everything(_gt_generator(), ds, score="area", progress=False)
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_everything(_gt_generator(), ds, max_dets=(10, 1), progress=False)
    with pytest.raises(ValueError, match="ap_max_dets"):
        evaluate_everything(_gt_generator(), ds, max_dets=(1, 10), progress=False)
    with pytest.raises(ValueError, match="no images"):
        evaluate_everything(_gt_generator(), ds, limit=0, progress=False)
    with pytest.raises(ValueError, match="generator_kwargs"):
        evaluate_everything(_gt_generator(), ds, generator_kwargs={"a": 1}, progress=False)
    with pytest.raises(ValueError, match="mask generator"):
        evaluate_everything(object(), ds, progress=False)
    with pytest.raises(ValueError, match="item 0"):
        evaluate_everything(_gt_generator(), [object()], progress=False)

    class NoScores:
        def generate(self, image):
            return [{"segmentation": np.ones(image.shape[:2], bool)}]

    with pytest.raises(ValueError, match="predicted_iou"):
        evaluate_everything(NoScores(), ds, progress=False)


def test_overlays_are_written(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "overlays"
    evaluate_everything(
        _gt_generator(), ManifestDataset(manifest), overlays=out, n_overlays=1, progress=False
    )
    (png,) = sorted(out.iterdir())
    assert png.name == "000_a.png"
    with Image.open(png) as im:
        assert im.size == (2 * W + 8, H) and im.mode == "RGB"


# --------------------------------------------------------------------------- box prompts
class BoxOracle:
    """Returns the ground-truth mask whose tight box is the prompt; optionally as the best
    of three candidates, the other two being wrong and scored lower."""

    def __init__(self, scenes: Any, fill_box: bool = False) -> None:
        self.by_image: dict[bytes, dict[tuple[int, ...], np.ndarray]] = {}
        for _, image, masks, _ in scenes:
            table = {}
            for m in masks:
                ys, xs = np.nonzero(m)
                table[(xs.min(), ys.min(), xs.max(), ys.max())] = m
            self.by_image[image.tobytes()] = table
        self.fill_box = fill_box
        self.boxes: list[tuple[int, ...]] = []

    def set_image(self, image: np.ndarray) -> None:
        self.table = self.by_image[image.tobytes()]

    def predict(self, box=None, multimask_output=True, return_logits=False, **kwargs):
        key = tuple(int(v) for v in box)
        self.boxes.append(key)
        if self.fill_box:
            x0, y0, x1, y1 = key
            mask = _rect(y0, y1 + 1, x0, x1 + 1)
        else:
            mask = self.table[key]
        if multimask_output:
            masks = np.stack([~mask, mask, np.zeros_like(mask)])
            scores = np.array([0.5, 0.9, 0.1], dtype=np.float32)
        else:
            masks, scores = mask[None], np.array([0.9], dtype=np.float32)
        logits = np.where(masks, 10.0, -10.0).astype(np.float32)
        low = np.zeros((len(masks), 256, 256), dtype=np.float32)
        return (logits if return_logits else masks), scores, low


def test_perfect_box_predictor_gives_ap_1_and_miou_1(manifest: Path) -> None:
    oracle = BoxOracle(_scenes())
    report = evaluate_box_prompted(oracle, ManifestDataset(manifest), progress=False)
    assert report["metrics"]["AP"] == pytest.approx(1.0)
    assert report["metrics"]["AR@100"] == pytest.approx(1.0)
    assert report["miou"] == pytest.approx(1.0)
    assert report["n_instances"] == 5 and report["n_crowd"] == 1
    assert len(oracle.boxes) == 5  # the crowd region is not prompted
    assert oracle.boxes[0] == (10, 10, 29, 29)  # inclusive max column / row
    assert {r["name"] for r in report["per_instance"]} >= {"a#0", "b#1"}
    json.dumps(report)
    best_of_3 = evaluate_box_prompted(oracle, ManifestDataset(manifest), multimask=True)
    assert best_of_3["metrics"]["AP"] == pytest.approx(1.0) and best_of_3["miou"] == 1.0


def test_box_filling_predictor_is_worse_on_round_objects(manifest: Path) -> None:
    report = evaluate_box_prompted(
        BoxOracle(_scenes(), fill_box=True), ManifestDataset(manifest), progress=False
    )
    ious = {r["name"]: r["iou"] for r in report["per_instance"]}
    assert ious["a#0"] == 1.0 and ious["b#0"] == 1.0  # rectangles
    assert 0.65 < ious["a#2"] < 0.8  # a disk in its box: about pi / 4 (0.71 at r = 12)
    assert report["miou"] < 1.0 and report["metrics"]["AP"] < 1.0


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model, _ = make_pair(TINY, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def test_cli_everything_and_box_with_a_tiny_model(
    manifest: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    from segany.cli import main

    out = tmp_path / "everything.json"
    code = main(
        [
            "eval",
            str(manifest),
            "--task",
            "everything",
            "--checkpoint",
            str(ckpt),
            "--points-per-side",
            "4",
            "--pred-iou-thresh",
            "0",
            "--stability-score-thresh",
            "0",
            "--overlays",
            str(tmp_path / "ov"),
            "--n-overlays",
            "1",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["task"] == "everything" and report["n_images"] == 2
    assert report["n_predictions"] > 0 and report["generator"]["points_per_layer"] == [16]
    assert set(report["metrics"]) >= {"AP", "AP50", "AR@1000", "AR_small@1000"}
    assert 0.0 <= report["metrics"]["AP"] <= 1.0
    assert len(list((tmp_path / "ov").iterdir())) == 1
    assert "AP " in capsys.readouterr().out

    out_box = tmp_path / "box.json"
    code = main(
        ["eval", str(manifest), "--task", "box", "--checkpoint", str(ckpt), "-o", str(out_box)]
    )
    assert code == 0
    box = json.loads(out_box.read_text())
    assert box["task"] == "box" and box["n_instances"] == 5 and 0.0 <= box["miou"] <= 1.0

    code = main(["eval", str(manifest), "--task", "box", "--plot", "x.png", "-o", str(out_box)])
    assert code == 1 and "--plot" in capsys.readouterr().err


def test_cli_interactive_default_and_coco_json_box_baseline(
    manifest: Path, tmp_path: Path, capsys
) -> None:
    from segany.cli import main

    out = tmp_path / "clicks.json"
    args = ["eval", str(manifest), "--baseline", "grabcut", "--max-clicks", "2", "--limit", "2"]
    assert main([*args, "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (
        report["n_instances"] == 2
        and len(report["miou_at"]) == 2
        and "NoC@85" in capsys.readouterr().out
    )

    image = _image(8)
    Image.fromarray(image).save(tmp_path / "im.png")
    coco = {
        "images": [{"id": 1, "file_name": "im.png", "height": H, "width": W}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]],
            },
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "box.json"
    code = main(
        [
            "eval",
            str(tmp_path / "ann.json"),
            "--task",
            "box",
            "--baseline",
            "grabcut",
            "-o",
            str(out),
        ]
    )
    assert code == 0 and json.loads(out.read_text())["n_instances"] == 1
    code = main(["eval", str(manifest), "--image-dir", str(tmp_path), "-o", str(out)])
    assert code == 1 and "--image-dir" in capsys.readouterr().err


def test_cli_interactive_zoom_in_and_flip(manifest: Path, ckpt: Path, tmp_path: Path, capsys):
    from segany.cli import main

    out = tmp_path / "zoom.json"
    args = ["eval", str(manifest), "--checkpoint", str(ckpt), "--max-clicks", "3", "--limit", "2"]
    assert main([*args, "--zoom-in", "--flip", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["predictor"] == "ZoomInPredictor" and len(report["miou_at"]) == 3
    assert report["predictor_settings"]["flip"] is True
    assert report["predictor_settings"]["first_click_refine"] is True
    assert "+zoom_in +flip" in capsys.readouterr().out
    code = main([*args, "--zoom-in", "--task", "box", "-o", str(out)])
    assert code == 1 and "--zoom-in" in capsys.readouterr().err
    code = main(["eval", str(manifest), "--baseline", "grabcut", "--flip", "-o", str(out)])
    assert code == 1 and "--flip" in capsys.readouterr().err
