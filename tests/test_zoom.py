"""ZoomInPredictor: crops, coordinates, feedback, flips and errors, on tiny random models.

The crop path is checked against a plain Predictor run on the crop by hand (shifted clicks,
the crop's own low-res frame, logits pasted back); the flip path against the average of a
Predictor on the image and on its mirror; without zoom or flip it must equal a Predictor
exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_LITE, randomize_, synthetic_image

from segany import Predictor, build_sam
from segany.evaluate import evaluate_interactive
from segany.zoom import ZoomInPredictor, object_roi

H, W = 120, 180


@pytest.fixture(scope="module", params=["vit", "lite"])
def model(request):
    torch.manual_seed(0)
    config = TINY if request.param == "vit" else TINY_LITE
    return randomize_(build_sam(config), 3, 0.2).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_image(H, W, seed=1)


def test_object_roi_known_values():
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 50:70] = True  # 20 x 20 box at (50..69, 40..59)
    assert object_roi(mask, None, expansion=1.0, min_size=1) == (50, 40, 70, 60)
    # grown about its centre (60, 50): 2x -> 40 x 40
    assert object_roi(mask, None, expansion=2.0, min_size=1) == (40, 30, 80, 70)
    # a positive point widens the box before growing
    assert object_roi(mask, np.array([[149.0, 50.0]]), expansion=1.0, min_size=1) == (
        50,
        40,
        150,
        60,
    )
    # the minimum side, then shifted inside the image at the border
    assert object_roi(mask, None, expansion=1.0, min_size=80) == (20, 10, 100, 90)
    corner = np.zeros((100, 200), dtype=bool)
    corner[0:10, 190:200] = True
    assert object_roi(corner, None, expansion=3.0, min_size=1) == (170, 0, 200, 30)
    # never larger than the image
    assert object_roi(mask, None, expansion=50.0, min_size=1) == (0, 0, 200, 100)
    assert object_roi(np.zeros((10, 10), dtype=bool), None, expansion=1.4, min_size=1) is None


def test_without_zoom_or_flip_it_is_the_predictor(model, image):
    plain = Predictor(model)
    plain.set_image(image)
    zoom = ZoomInPredictor(Predictor(model), skip_clicks=100, first_click_refine=False)
    zoom.set_image(image)
    pts, lab = np.array([[60.0, 40.0]]), np.array([1])
    m0, s0, l0 = plain.predict(pts, lab, return_logits=True)
    m1, s1, l1 = zoom.predict(pts, lab, return_logits=True)
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(l0, l1)
    pts2, lab2 = np.array([[60.0, 40.0], [100.0, 90.0]]), np.array([1, 0])
    m0, s0, l0 = plain.predict(pts2, lab2, mask_input=l0[:1], multimask_output=False)
    m1, s1, l1 = zoom.predict(pts2, lab2, mask_input=l1[:1], multimask_output=False)
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(s0, s1)
    assert zoom.crops_encoded == 0


def test_crop_prediction_is_the_predictor_on_the_crop(model, image):
    """A later click is decoded on the crop around the previous mask, with shifted clicks and
    the previous logits in the crop's frame, and pasted into the previous logits."""
    zoom = ZoomInPredictor(Predictor(model), expansion=1.2, min_crop=0.3)
    zoom.set_image(image)
    designed = np.full((H, W), -6.0, dtype=np.float32)
    designed[30:60, 40:80] = 6.0  # the "previous" object
    mask_input = zoom._to_low(designed)[None]
    prev_full = zoom._previous_logits(mask_input)  # not returned before: upsampled
    # one negative click inside the crop, one far outside it
    pts = np.array([[60.0, 40.0], [62.0, 44.0], [179.0, 119.0]])
    lab = np.array([1, 0, 0])
    rect = object_roi(prev_full > 0, pts[:1], expansion=1.2, min_size=0.3 * W)
    assert rect is not None
    x0, y0, x1, y1 = rect
    assert x1 < 170 and y1 < 110, "the far click must fall outside the crop"
    out, out_scores, out_low = zoom.predict(
        pts, lab, mask_input=mask_input, multimask_output=False, return_logits=True
    )
    assert zoom.crops_encoded == 1 and zoom._crop_rect == rect
    by_hand = Predictor(model)
    by_hand.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
    crop_in = zoom._to_low(prev_full[y0:y1, x0:x1])[None]
    ref, ref_scores, _ = by_hand.predict(
        pts[:2] - [x0, y0], lab[:2], mask_input=crop_in, multimask_output=False, return_logits=True
    )
    np.testing.assert_allclose(out[0, y0:y1, x0:x1], ref[0], atol=1e-5)
    np.testing.assert_allclose(out_scores, ref_scores, atol=1e-6)
    outside = np.ones((H, W), dtype=bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[0][outside], prev_full[outside])
    assert out_low.shape == (1, *model.prompt_encoder.mask_input_size)


def test_fed_back_logits_are_the_full_size_ones(model, image):
    """A mask_input equal to a returned low-res array stands for the full-size logits behind
    it; any other mask_input is upsampled (and both give valid predictions)."""
    zoom = ZoomInPredictor(Predictor(model), min_crop=0.5)
    zoom.set_image(image)
    masks, scores, low = zoom.predict(np.array([[60.0, 40.0]]), np.array([1]), return_logits=True)
    for c in range(len(low)):
        np.testing.assert_array_equal(zoom._previous_logits(low[c : c + 1]), masks[c])
    other = low[:1] + 0.25
    approx = zoom._previous_logits(other)
    assert approx.shape == (H, W)
    assert not np.array_equal(approx, masks[0])


def test_crop_is_kept_while_the_object_stays_inside(model, image):
    zoom = ZoomInPredictor(Predictor(model), min_crop=0.6, recompute_iou=0.0)
    zoom.set_image(image)
    pts, lab = np.array([[60.0, 40.0]]), np.array([1])
    masks, scores, low = zoom.predict(pts, lab)
    prev = low[int(np.argmax(scores))][None]
    for k in range(3):
        pts = np.concatenate([pts, [[61.0 + k, 41.0]]])
        lab = np.concatenate([lab, [1]])
        _, _, low = zoom.predict(pts, lab, mask_input=prev, multimask_output=False)
        prev = low
    assert zoom.crops_encoded <= 2  # re-encoded only if the object left the crop


def test_flip_averages_the_mirrored_prediction(model, image):
    zoom = ZoomInPredictor(Predictor(model), flip=True, skip_clicks=100, first_click_refine=False)
    zoom.set_image(image)
    pts, lab = np.array([[60.0, 40.0], [150.0, 100.0]]), np.array([1, 0])
    got, got_scores, _ = zoom.predict(pts, lab, return_logits=True)
    a, b = Predictor(model), Predictor(model)
    a.set_image(image)
    b.set_image(np.ascontiguousarray(image[:, ::-1]))
    ma, sa, _ = a.predict(pts, lab, return_logits=True)
    mirrored = pts.copy()
    mirrored[:, 0] = W - 1 - mirrored[:, 0]
    mb, sb, _ = b.predict(mirrored, lab, return_logits=True)
    np.testing.assert_allclose(got, (ma + mb[..., ::-1]) / 2, atol=1e-5)
    np.testing.assert_allclose(got_scores, (sa + sb) / 2, atol=1e-6)


def test_box_zoom_and_first_click_refine_run(model, image):
    zoom = ZoomInPredictor(Predictor(model), zoom_boxes=True, first_click_refine=True)
    zoom.set_image(image)
    masks, scores, low = zoom.predict(box=np.array([40.0, 20, 100, 80]), multimask_output=False)
    assert masks.shape == (1, H, W) and masks.dtype == bool and zoom.crops_encoded == 1
    # outside the (grown) box's crop nothing is object
    x0, y0, x1, y1 = zoom._crop_rect
    assert not masks[0, :, :x0].any() and not masks[0, :, x1:].any()
    masks, scores, low = zoom.predict(np.array([[60.0, 40.0]]), np.array([1]))
    assert masks.shape == (3, H, W) and scores.shape == (3,)


def test_evaluator_runs_with_zoom(model, image):
    gt = np.zeros((H, W), dtype=bool)
    gt[30:90, 40:120] = True
    zoom = ZoomInPredictor(Predictor(model), flip=True)
    report = evaluate_interactive(zoom, [("a", image, gt)], max_clicks=4, progress=False)
    assert len(report["miou_at"]) == 4
    assert zoom.crops_encoded >= 1


def test_bad_input(model, image):
    zoom = ZoomInPredictor(Predictor(model))
    with pytest.raises(RuntimeError, match="set_image"):
        zoom.predict(np.array([[1.0, 1.0]]), np.array([1]))
    zoom.set_image(image)
    with pytest.raises(ValueError, match="out of bounds"):
        zoom.predict(np.array([[W + 5.0, 1.0]]), np.array([1]))
    with pytest.raises(ValueError, match="one object"):
        zoom.predict(np.zeros((2, 1, 2)), np.ones((2, 1)))
    with pytest.raises(ValueError, match="together"):
        zoom.predict(np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        zoom.predict(np.array([[np.nan, 1.0]]), np.array([1]))
    m = model.prompt_encoder.mask_input_size
    with pytest.raises(ValueError, match="mask_input"):
        zoom.predict(np.array([[1.0, 1.0]]), np.array([1]), mask_input=np.zeros((1, 7, 7)))
    bad = np.zeros((1, *m), dtype=np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN|infinite"):
        zoom.predict(np.array([[1.0, 1.0]]), np.array([1]), mask_input=bad)
    with pytest.raises(ValueError, match="box"):
        zoom.predict(box=np.array([1.0, 2.0, 3.0]))
    for kwargs in ({"expansion": 0.5}, {"min_crop": 2.0}, {"skip_clicks": -1}):
        with pytest.raises(ValueError):
            ZoomInPredictor(Predictor(model), **kwargs)
    with pytest.raises(TypeError):
        ZoomInPredictor(model)  # type: ignore[arg-type]


def test_set_encoded_image_reuses_the_embedding(model, image):
    base = Predictor(model)
    base.set_image(image)
    zoom = ZoomInPredictor(base, zoom_boxes=True)
    zoom.set_encoded_image(image)
    fresh = ZoomInPredictor(Predictor(model), zoom_boxes=True)
    fresh.set_image(image)
    box = np.array([40.0, 20, 100, 80])
    a, b = zoom.predict(box=box), fresh.predict(box=box)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="embedding was made"):
        zoom.set_encoded_image(image[:60])
    with pytest.raises(RuntimeError, match="no embedding"):
        ZoomInPredictor(Predictor(model)).set_encoded_image(image)


@pytest.mark.parametrize("flip", [False, True])
def test_a_crop_handed_over_continues_the_refinement_exactly(model, image, flip):
    """A fresh predictor told the crop (use_crop with the donor's encoding, or encode_crop
    from the rectangle alone) answers a later click exactly as the donor that kept it; and
    the donor's crop predictors are never reset or re-encoded by the one that took them."""
    donor = ZoomInPredictor(Predictor(model), min_crop=0.6, recompute_iou=0.0, flip=flip)
    donor.set_image(image)
    pts, lab = np.array([[60.0, 40.0]]), np.array([1])
    _, scores, low = donor.predict(pts, lab)
    held = donor.encoded_crop()
    assert held is not None and held[0] == donor.crop_rect
    rect, crop, mirror = held
    assert (mirror is not None) == flip
    prev = low[int(np.argmax(scores))][None].copy()
    pts2, lab2 = np.array([[60.0, 40.0], [70.0, 45.0]]), np.array([1, 1])

    taker = ZoomInPredictor(Predictor(model), min_crop=0.6, recompute_iou=0.0, flip=flip)
    taker.set_image(image)
    taker.use_crop(rect, crop, mirror)
    rebuilt = ZoomInPredictor(Predictor(model), min_crop=0.6, recompute_iou=0.0, flip=flip)
    rebuilt.set_image(image)
    rebuilt.encode_crop(list(rect))
    assert rebuilt.crops_encoded == 1 and rebuilt.crop_rect == rect
    # The donor's answer with the upsampled mask_input (what a stateless caller sends).
    donor._last_low = donor._last_full = None
    want = donor.predict(pts2, lab2, mask_input=prev, multimask_output=False, return_logits=True)
    for other in (taker, rebuilt):
        got = other.predict(pts2, lab2, mask_input=prev, multimask_output=False, return_logits=True)
        for x, y in zip(want, got):
            np.testing.assert_array_equal(x, y)
    assert taker.crops_encoded == 0  # the handed-over crop was used as it is
    # A crop the taker must move to gets new predictors; the donor's keep their embedding.
    before = crop.features.clone()
    taker.encode_crop((0, 0, W // 3, H // 3))
    assert taker.crop is not crop and crop.is_image_set
    torch.testing.assert_close(crop.features, before, rtol=0, atol=0)
    taker.reset_image()
    assert crop.is_image_set and crop.original_size == (rect[3] - rect[1], rect[2] - rect[0])


def test_crop_handover_errors(model, image):
    zoom = ZoomInPredictor(Predictor(model))
    with pytest.raises(RuntimeError, match="set_image"):
        zoom.encode_crop((0, 0, 10, 10))
    zoom.set_image(image)
    assert zoom.crop_rect is None and zoom.encoded_crop() is None
    for rect in ((0, 0, W + 1, 10), (10, 10, 10, 20), (-1, 0, 5, 5), (0, 0, 5), (0, 0, 5.5, 5)):
        with pytest.raises(ValueError, match="crop"):
            zoom.encode_crop(rect)
    part = Predictor(model)
    with pytest.raises(ValueError, match="no embedding"):
        zoom.use_crop((0, 0, 40, 30), part)
    part.set_image(image[:30, :41])
    with pytest.raises(ValueError, match="no embedding of a 40 x 30"):
        zoom.use_crop((0, 0, 40, 30), part)
    other = build_sam(TINY).eval()
    with pytest.raises(ValueError, match="this predictor's model"):
        zoom.use_crop((0, 0, 41, 30), Predictor(other))
    zoom.use_crop((0, 0, 41, 30), part)
    assert zoom.crop_rect == (0, 0, 41, 30)
    flipped = ZoomInPredictor(Predictor(model), flip=True)
    flipped.set_image(image)
    with pytest.raises(ValueError, match="crop_mirror is required"):
        flipped.use_crop((0, 0, 41, 30), part)
