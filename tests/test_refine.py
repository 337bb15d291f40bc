"""Mask refinement with the photo as guide (``segany.refine``) and its use by the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, TINY_LITE, randomize_, synthetic_image

from segany import Predictor
from segany.modeling import build_sam
from segany.refine import GuidedRefiner, _coefficients, _guide_terms
from segany.zoom import ZoomInPredictor


def _brute_force(image: np.ndarray, p: np.ndarray, r: int, eps: float) -> np.ndarray:
    """The guided filter from its definition: per window a least-squares fit
    ``p ~ a . I + b`` with ``eps |a|^2``, then each pixel averages the fits of its windows.
    Valid for pixels at least 2r from the border (no window there is cut)."""
    guide = image.astype(np.float64) / 255.0
    h, w = p.shape
    coef = np.zeros((h, w, 4))
    for y in range(r, h - r):
        for x in range(r, w - r):
            gi = guide[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3)
            pi = p[y - r : y + r + 1, x - r : x + r + 1].reshape(-1)
            mi, mp = gi.mean(0), pi.mean()
            cov = (gi - mi).T @ (gi - mi) / len(pi) + eps * np.eye(3)
            a = np.linalg.solve(cov, (gi - mi).T @ (pi - mp) / len(pi))
            coef[y, x] = (*a, mp - a @ mi)
    out = np.full((h, w), np.nan)
    for y in range(2 * r, h - 2 * r):
        for x in range(2 * r, w - 2 * r):
            c = coef[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 4).mean(0)
            out[y, x] = c[:3] @ guide[y, x] + c[3]
    return out


def test_guided_filter_is_the_windowed_least_squares_fit() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (22, 25, 3), dtype=np.uint8)
    p = rng.random((22, 25)).astype(np.float32)
    for r, eps in ((2, 1e-3), (3, 1e-2)):
        got = _guided_filter(_guide_terms(image, r, eps), p, r)
        want = _brute_force(image, p.astype(np.float64), r, eps)
        inner = ~np.isnan(want)
        assert inner.sum() > 20
        np.testing.assert_allclose(got[inner], want[inner], atol=2e-4)


def test_refine_snaps_a_smooth_boundary_onto_the_image_edge() -> None:
    # A dark left part and a bright right part meeting at column 40; the predicted logits
    # ramp slowly and cross 0 at column 42.5, as bilinear upsampling of a coarse mask does.
    h, w = 48, 96
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 40:] = (200, 180, 160)
    image = (image + np.random.default_rng(1).integers(0, 8, image.shape)).astype(np.uint8)
    logits = np.tile((np.arange(w, dtype=np.float32) - 42.5) * 0.5, (h, 1))
    refiner = GuidedRefiner(radius=2.0, eps=1e-3, mask_grid=24)  # 8 px windows
    refiner.set_image(image)
    refined = refiner.refine(logits)
    truth = np.zeros((h, w), bool)
    truth[:, 40:] = True
    assert (logits > 0).sum() == truth.sum() - 3 * h  # 3 columns off before
    assert (refined > 0)[:, 8:-8].tolist() == truth[:, 8:-8].tolist()
    assert refined.dtype == np.float32 and refined.shape == logits.shape


def test_keep_clicks_never_undoes_a_click() -> None:
    # The step edge of the test above: refinement moves the boundary from 42.5 to 40, so a
    # negative click at column 41 (background for the decoder) would end up inside.
    h, w = 48, 96
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 40:] = (200, 180, 160)
    logits = np.tile((np.arange(w, dtype=np.float32) - 42.5) * 0.5, (h, 1))
    stack = np.stack([logits, logits + 30.0])  # a second mask, all object: left alone
    click, label = np.array([[41.0, 24.0]]), np.array([0])
    refiner = GuidedRefiner(radius=2.0, mask_grid=24)
    refiner.set_image(image)
    free = refiner.refine(stack)
    assert free[0, 24, 41] > 0  # the refinement alone flips the clicked pixel
    kept = refiner.refine(stack, click, label)
    assert kept[0, 24, 41] < 0 and kept[0, 24, 41] <= logits[24, 41]
    far = np.ones((h, w), bool)
    far[24 - 8 : 24 + 9, 41 - 8 : 41 + 9] = False  # outside the click's window: as refined
    np.testing.assert_array_equal(kept[0][far], free[0][far])
    np.testing.assert_array_equal(kept[1], free[1])
    # batched clicks: one set per item of the first axis; label -1 (padding) is ignored
    pairs = np.array([[[41.0, 24.0]], [[5.0, 5.0]]])
    both = refiner.refine(stack[:, None], pairs, [[0], [-1]])
    np.testing.assert_array_equal(both[0, 0], kept[0])
    with pytest.raises(ValueError, match="point sets"):
        refiner.refine(stack, np.zeros((3, 1, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="together"):
        refiner.refine(stack, click, None)


def test_refine_leaves_flat_logits_and_far_pixels_alone() -> None:
    image = synthetic_image(60, 80)
    refiner = GuidedRefiner(radius=1.0, mask_grid=80)  # 1 px windows, 3 px band margin
    refiner.set_image(image)
    flat = np.full((2, 60, 80), -15.0, np.float32)
    np.testing.assert_array_equal(refiner.refine(flat), flat)
    # A small object: only the box around its boundary (grown by the margin) may change.
    logits = np.full((60, 80), -20.0, np.float32)
    logits[20:30, 30:45] = 20.0
    out = refiner.refine(logits)
    changed = np.argwhere(out != logits)
    assert changed.size
    assert changed[:, 0].min() >= 20 - 4 and changed[:, 0].max() <= 29 + 4
    assert changed[:, 1].min() >= 30 - 4 and changed[:, 1].max() <= 44 + 4


def test_tiles_and_uncached_planes_give_the_one_pass_result(monkeypatch) -> None:
    # The full-resolution pass runs in tiles, skipping those far from the boundary, and large
    # photos without the kept colour planes: the same result as one tile, with and without
    # subsampling.
    import segany.refine as refine

    image = synthetic_image(70, 90, seed=4)
    yy, xx = np.mgrid[:70, :90]
    logits = (12.0 - np.hypot(yy - 35, xx - 40) / 2).astype(np.float32)
    for grid in (75, 18):  # 1.2 and 5 px a cell: subsample 1 and 5 (fitted at 18 x 14)
        # (the refined pixels span the 8-px tiles away from the circle's band: some skipped)
        one = GuidedRefiner(radius=2.0, mask_grid=grid)
        one.set_image(image)
        want = one.refine(logits)
        with monkeypatch.context() as m:
            m.setattr(refine, "_TILE", 8)
            m.setattr(refine, "_ONE_PASS_PIXELS", 100)
            m.setattr(refine, "_PLANES_PIXELS", 100)
            strips = GuidedRefiner(radius=2.0, mask_grid=grid)
            strips.set_image(image)
            # (as probabilities: far from the boundary a skipped tile keeps the given logit
            # where one pass would have clipped it at the refinement's 1e-6 floor)
            np.testing.assert_allclose(_prob(strips.refine(logits)), _prob(want), atol=1e-5)
            np.testing.assert_array_equal(strips.refine(logits, threshold=0.5), want > 0.5)
            assert strips._cache[1][1] is None


def test_subsampled_refinement_is_the_fast_guided_filter() -> None:
    # At 1/s the windows are fitted on the area-averaged photo and resampled logits, and the
    # fits, bilinearly interpolated, applied to the full-resolution colours (He and Sun 2015).
    import cv2

    image = synthetic_image(64, 96, seed=5)
    yy, xx = np.mgrid[:64, :96]
    logits = (8.0 - np.hypot(yy - 30, xx - 50) / 3).astype(np.float32)
    refiner = GuidedRefiner(radius=2.0, mask_grid=24)  # 4 px a cell: s = 4, r = 8 -> 2
    refiner.set_image(image)
    assert refiner.subsample(image.shape[:2]) == 4
    got = refiner.refine(logits)
    low = cv2.resize(image, (24, 16), interpolation=cv2.INTER_AREA)
    low_logits = cv2.resize(logits, (24, 16), interpolation=cv2.INTER_LINEAR)
    p = 1 / (1 + np.exp(-low_logits))
    coef = refine_coefficients(low, p.astype(np.float32), 2)
    up = np.stack([cv2.resize(c, (96, 64), interpolation=cv2.INTER_LINEAR) for c in coef])
    g = image.astype(np.float32) / 255
    q = np.clip(up[0] * g[..., 0] + up[1] * g[..., 1] + up[2] * g[..., 2] + up[3], 1e-6, 1 - 1e-6)
    want = np.log(q / (1 - q))
    from segany.refine import _band

    assert _band(low_logits, 6) == (0, 16, 0, 24)  # the band's box is the whole photo here
    # (cv2's affine warp interpolates at 1/32-pixel steps, cv2.resize exactly)
    np.testing.assert_allclose(_prob(got), _prob(want), atol=2e-4)
    np.testing.assert_allclose(got, want, atol=2e-2)


def test_fit_scale_one_is_the_full_resolution_filter() -> None:
    image = synthetic_image(64, 96, seed=5)
    yy, xx = np.mgrid[:64, :96]
    logits = (8.0 - np.hypot(yy - 30, xx - 50) / 3).astype(np.float32)
    full = GuidedRefiner(radius=2.0, mask_grid=24, fit_scale=1)
    auto = GuidedRefiner(radius=2.0, mask_grid=24)
    for r in (full, auto):
        r.set_image(image)
    assert full.subsample(image.shape[:2]) == 1 and auto.subsample(image.shape[:2]) == 4
    p = (1 / (1 + np.exp(-logits))).astype(np.float32)
    q = np.clip(_guided_filter(_guide_terms(image, 8, 1e-3), p, 8), 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(full.refine(logits), np.log(q / (1 - q)), atol=2e-3)
    assert not np.allclose(auto.refine(logits), full.refine(logits), atol=2e-3)


def _prob(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def refine_coefficients(image: np.ndarray, p: np.ndarray, r: int) -> np.ndarray:
    return _coefficients(_guide_terms(image, r, 1e-3), p, r)


def _guided_filter(terms, p: np.ndarray, r: int) -> np.ndarray:
    """The colour guided filter of ``p`` at the guide's own resolution: the refiner's fitted
    coefficients applied to the guide (what ``fit_scale=1`` computes)."""
    c = _coefficients(terms, p, r)
    g = terms.guide
    return c[0] * g[0] + c[1] * g[1] + c[2] * g[2] + c[3]


def test_refiner_rejects_bad_settings_and_inputs() -> None:
    bad = (
        {"radius": 0},
        {"radius": float("nan")},
        {"eps": 0.0},
        {"mask_grid": 0},
        {"fit_scale": 0},
    )
    for kwargs in bad:
        with pytest.raises(ValueError):
            GuidedRefiner(**kwargs)
    refiner = GuidedRefiner()
    with pytest.raises(RuntimeError, match="set_image"):
        refiner.refine(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        refiner.set_image(np.zeros((4, 4), np.uint8))
    refiner.set_image(np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        refiner.refine(np.zeros((5, 4), np.float32))


@pytest.fixture(scope="module")
def lite_model():
    return randomize_(build_sam(TINY_LITE), seed=3).eval()


def test_predictor_refines_segany_lite_by_default_and_not_sam(lite_model) -> None:
    assert isinstance(Predictor(lite_model).refiner, GuidedRefiner)
    assert Predictor(randomize_(build_sam(TINY), 0).eval()).refiner is None
    assert Predictor(lite_model, refine=False).refiner is None
    with pytest.raises(ValueError, match="refine"):
        Predictor(lite_model, refine="sharp")
    mine = GuidedRefiner(radius=1.5, eps=1e-2)
    p = Predictor(lite_model, refine=mine)
    assert p.refiner is not mine and p.refiner.radius == 1.5 and p.refiner.eps == 1e-2
    assert p.refiner.mask_grid == lite_model.prompt_encoder.mask_input_size[0]


def test_refined_masks_are_the_refined_logits_thresholded(lite_model) -> None:
    image = synthetic_image(90, 130)
    plain, refined = Predictor(lite_model, refine=False), Predictor(lite_model, refine=True)
    plain.set_image(image)
    refined.set_image(image)
    pts, lab = np.array([[60.0, 40.0], [20.0, 70.0]]), np.array([1, 0])
    logits, scores, low = plain.predict(pts, lab, return_logits=True)
    r_logits, r_scores, r_low = refined.predict(pts, lab, return_logits=True)
    masks, _, _ = refined.predict(pts, lab)
    np.testing.assert_array_equal(r_scores, scores)  # the decoder's outputs are untouched
    np.testing.assert_array_equal(r_low, low)
    guide = GuidedRefiner(mask_grid=refined.refiner.mask_grid)
    guide.set_image(image)
    np.testing.assert_allclose(r_logits, guide.refine(logits), atol=1e-5)
    np.testing.assert_array_equal(masks, r_logits > lite_model.mask_threshold)
    assert not np.array_equal(r_logits, logits)
    # A batch of objects gives each object's result alone.
    boxes = np.array([[10, 10, 70, 60], [50, 20, 120, 85]], dtype=np.float64)
    batch, _, _ = refined.predict(box=boxes, multimask_output=False, return_logits=True)
    for i, b in enumerate(boxes):
        one, _, _ = refined.predict(box=b, multimask_output=False, return_logits=True)
        np.testing.assert_allclose(batch[i], one, atol=1e-5)


def test_keep_clicks_passes_the_prompt_clicks_in_image_pixels(lite_model) -> None:
    image = synthetic_image(90, 130)
    pred = Predictor(lite_model, refine=GuidedRefiner(keep_clicks=True))
    plain = Predictor(lite_model, refine=False)
    pred.set_image(image)
    plain.set_image(image)
    pts, lab = np.array([[60.0, 40.0], [20.0, 70.0], [5.0, 5.0]]), np.array([1, 0, -1])
    got, _, _ = pred.predict(pts, lab, return_logits=True)
    logits, _, _ = plain.predict(pts, lab, return_logits=True)
    want = pred.refiner.refine(logits, pts, lab)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(want, pred.refiner.refine(logits), atol=1e-3)


def test_refinement_needs_the_photo_after_load_embedding(lite_model, tmp_path) -> None:
    image = synthetic_image(90, 130)
    source = Predictor(lite_model)
    source.set_image(image)
    want, _, _ = source.predict(np.array([[60.0, 40.0]]), np.array([1]), return_logits=True)
    source.save_embedding(tmp_path / "e.safetensors")
    loaded = Predictor(lite_model)
    loaded.load_embedding(tmp_path / "e.safetensors")
    got, _, _ = loaded.predict(np.array([[60.0, 40.0]]), np.array([1]), return_logits=True)
    assert not np.allclose(got, want, atol=1e-4)  # no photo: decoded logits as they are
    with pytest.raises(ValueError, match="does not match"):
        loaded.set_guide_image(image[:50])
    loaded.set_guide_image(image)
    got, _, _ = loaded.predict(np.array([[60.0, 40.0]]), np.array([1]), return_logits=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_zoom_in_predictors_share_the_refine_setting(lite_model) -> None:
    off = ZoomInPredictor(Predictor(lite_model, refine=False), flip=True)
    assert off.full_mirror.refiner is None and off.crop.refiner is None
    on = ZoomInPredictor(Predictor(lite_model, refine=GuidedRefiner(radius=1.5)), flip=True)
    assert on.full_mirror.refiner.radius == 1.5 and on.crop_mirror.refiner.radius == 1.5
