"""'Segment everything' parity with the reference SamAutomaticMaskGenerator (same weights).

Tolerances: the same number of masks; records matched one to one with mask IoU >= 0.999,
predicted_iou and stability_score within 1e-4 (absolute or relative), identical bbox, area within 0.1 % and
identical point_coords/crop_box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, make_pair, mask_iou, synthetic_image

from segany import AutomaticMaskGenerator, Predictor
from segany.automatic import (
    batched_mask_to_box,
    batched_nms,
    build_point_grid,
    calculate_stability_score,
    count_true,
    nms,
    remove_small_regions,
)
from segany.masks import decode_rle

# Random weights make degenerate masks (near-empty or near-full, which NMS collapses), so the
# pipeline tests plant a deterministic decoder in BOTH models: each grid point gets three
# discs of growing radius around it, roughened by the (real, random) image embedding so that
# masks have islands and holes. The real decoder's parity is covered by test_parity.py.
SETTINGS = dict(
    points_per_side=8,
    pred_iou_thresh=0.5,
    stability_score_thresh=0.5,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
)


class PointPassingPromptEncoder(torch.nn.Module):
    """Puts the raw point coordinates into the sparse embedding for the planted decoder."""

    def __init__(self, real: torch.nn.Module) -> None:
        super().__init__()
        self.real = real
        self.mask_input_size = real.mask_input_size

    def get_dense_pe(self) -> torch.Tensor:
        return self.real.get_dense_pe()

    def forward(self, points, boxes, masks):
        coords, _ = points
        b = coords.shape[0]
        sparse = torch.zeros(b, 2, 32)
        sparse[:, 0, :2] = coords[:, 0].float()
        return sparse, torch.zeros(b, 32, 10, 10)


class DiscDecoder(torch.nn.Module):
    def forward(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output,
    ):
        c = sparse_prompt_embeddings[:, 0, :2] / 4.0  # model input frame -> 40 x 40 low-res
        yy, xx = torch.meshgrid(torch.arange(40.0) + 0.5, torch.arange(40.0) + 0.5, indexing="ij")
        dist = (
            (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
        ).sqrt()
        emb = image_embeddings[:1, :1]
        tex = torch.nn.functional.interpolate(emb / emb.std(), (40, 40), mode="nearest")[0, 0]
        radii = torch.tensor([5.0, 2.0, 5.0, 9.0])
        logits = (radii[None, :, None, None] - dist[:, None]) * 1.0 + 4.0 * tex
        iou = 0.6 + 0.4 * torch.sin(c[:, :1] * 0.7 + c[:, 1:] * 0.3 + torch.arange(4.0))
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return logits[:, sl], iou[:, sl]


@pytest.fixture(scope="module")
def amg_pair():
    ours, ref = make_pair(TINY, seed=12)
    for m in (ours, ref):
        m.prompt_encoder = PointPassingPromptEncoder(m.prompt_encoder)
        m.mask_decoder = DiscDecoder()
    return ours, ref


def _as_mask(seg) -> np.ndarray:
    if isinstance(seg, np.ndarray):
        return seg.astype(bool)
    return decode_rle(seg)


def _match(ours: list[dict], ref: list[dict]) -> None:
    assert len(ours) == len(ref)
    key = lambda r: (tuple(r["point_coords"][0]), round(r["predicted_iou"], 3))  # noqa: E731
    ours, ref = sorted(ours, key=key), sorted(ref, key=key)
    for a, b in zip(ours, ref):
        assert a["point_coords"][0] == pytest.approx(b["point_coords"][0])
        assert a["crop_box"] == b["crop_box"]
        assert a["bbox"] == b["bbox"]
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], rel=1e-4, abs=1e-4)
        assert a["stability_score"] == pytest.approx(b["stability_score"], rel=1e-4, abs=1e-4)
        assert abs(a["area"] - b["area"]) <= max(1, 0.001 * b["area"])
        assert mask_iou(_as_mask(a["segmentation"]), _as_mask(b["segmentation"])) >= 0.999


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(crop_n_layers=1, crop_n_points_downscale_factor=2, points_per_batch=16),
        dict(min_mask_region_area=300),
        dict(crop_n_layers=1, crop_n_points_downscale_factor=2, mask_chunk_bytes=1),
        dict(mask_chunk_bytes=5 * 96 * 128 * 5),
    ],
    ids=["plain", "crops", "small_regions", "crops_one_mask_at_a_time", "chunks_of_5"],
)
def test_generator_matches_reference(amg_pair, extra):
    """``mask_chunk_bytes`` (ours only) bounds memory without changing the masks."""
    from segment_anything import SamAutomaticMaskGenerator

    ours_model, ref_model = amg_pair
    img = synthetic_image(96, 128, seed=3)
    kw = {**SETTINGS, **extra}
    ours = AutomaticMaskGenerator(ours_model, **kw).generate(img)
    kw.pop("mask_chunk_bytes", None)
    ref = SamAutomaticMaskGenerator(ref_model, **kw).generate(img)
    assert len(ref) >= 8, "settings must keep enough masks for the comparison to bite"
    _match(ours, ref)


def test_real_random_weights_match_reference():
    """End to end with the real (random-weight) decoder: few masks survive, but the same."""
    from segment_anything import SamAutomaticMaskGenerator

    ours_model, ref_model = make_pair(TINY, seed=12)
    img = synthetic_image(96, 128, seed=3)
    kw = dict(points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0.0, box_nms_thresh=0.95)
    ours = AutomaticMaskGenerator(ours_model, **kw).generate(img)
    ref = SamAutomaticMaskGenerator(ref_model, **kw).generate(img)
    assert len(ref) >= 1
    _match(ours, ref)


@pytest.mark.parametrize("mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_output_modes_match_reference(amg_pair, mode):
    from segment_anything import SamAutomaticMaskGenerator

    ours_model, ref_model = amg_pair
    img = synthetic_image(64, 80, seed=4)
    kw = {**SETTINGS, "output_mode": mode}
    ours = AutomaticMaskGenerator(ours_model, **kw).generate(img)
    ref = SamAutomaticMaskGenerator(ref_model, **kw).generate(img)
    assert len(ref) >= 3
    key = lambda r: (tuple(r["point_coords"][0]), round(r["predicted_iou"], 3))  # noqa: E731
    for a, b in zip(sorted(ours, key=key), sorted(ref, key=key)):
        assert type(a["segmentation"]) is type(b["segmentation"])
        if mode == "binary_mask":
            assert a["segmentation"].shape == b["segmentation"].shape == (64, 80)
            assert a["segmentation"].dtype == b["segmentation"].dtype
        else:
            assert a["segmentation"]["size"] == b["segmentation"]["size"]
            if mode == "uncompressed_rle":
                assert a["segmentation"]["counts"] == b["segmentation"]["counts"]
            else:
                assert isinstance(a["segmentation"]["counts"], str)
        assert set(a) == set(b)


def test_nms_matches_torchvision_including_ties():
    import torchvision

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 200
        xy = torch.rand(n, 2, generator=g) * 50
        wh = torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + wh], 1).round()
        # Many exact ties in score (as in the small-region step: scores 0/1).
        scores = (torch.rand(n, generator=g) * (2 if trial % 2 else 1000)).floor()
        for thr in (0.3, 0.7):
            ref = torchvision.ops.nms(boxes, scores, thr)
            assert sorted(nms(boxes, scores, thr).tolist()) == sorted(ref.tolist())
            ref_b = torchvision.ops.batched_nms(boxes, scores, torch.zeros(n), thr)
            assert sorted(batched_nms(boxes, scores, torch.zeros(n), thr).tolist()) == sorted(
                ref_b.tolist()
            )


def test_mask_to_box_matches_reference():
    from segment_anything.utils.amg import batched_mask_to_box as ref_box

    rng = np.random.default_rng(0)
    masks = torch.as_tensor(rng.random((6, 20, 30)) > 0.97)
    masks[0] = False  # empty -> zeros
    masks[1] = True
    torch.testing.assert_close(batched_mask_to_box(masks), ref_box(masks))


def test_remove_small_regions_matches_reference():
    from segment_anything.utils.amg import remove_small_regions as ref_rsr

    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = rng.random((40, 50)) > 0.6
        for mode in ("holes", "islands"):
            a, ca = remove_small_regions(mask, 5, mode)
            b, cb = ref_rsr(mask, 5, mode)
            assert ca == cb
            np.testing.assert_array_equal(a, b)


def test_iou_floor_skips_masks_without_changing_the_result():
    """With a predicted-IoU threshold the decoder upscales only prompts that can keep a
    mask; the generator still returns exactly the reference's masks."""
    from segment_anything import SamAutomaticMaskGenerator

    torch.manual_seed(0)  # the buffers make_pair leaves random (positional frequencies)
    ours_model, ref_model = make_pair(TINY, seed=12)
    with torch.no_grad():  # spread the random IoU head's outputs (nearly constant otherwise)
        for m in (ours_model, ref_model):
            last = m.mask_decoder.iou_prediction_head.layers[-1]
            last.weight.mul_(50.0)
    img = synthetic_image(96, 128, seed=3)
    # the best predicted IoU of each grid prompt; the threshold goes in a clear gap near their
    # median, so about half the prompts are skipped and float noise moves none across it
    pred = Predictor(ours_model)
    pred.set_image(img)
    grid = build_point_grid(8) * np.array([128, 96])
    _, iou, _ = pred.predict_batch(grid[:, None, :], np.ones((64, 1), dtype=int))
    best = np.sort(iou.max(1))
    gap, i = max((best[i + 1] - best[i], i) for i in range(16, 48))
    assert gap > 1e-3
    thresh = float(best[i] + best[i + 1]) / 2
    assert 16 <= (best <= thresh).sum() <= 48
    kw = dict(
        points_per_side=8, pred_iou_thresh=thresh, stability_score_thresh=0.0, box_nms_thresh=0.95
    )
    ours = AutomaticMaskGenerator(ours_model, **kw).generate(img)
    ref = SamAutomaticMaskGenerator(ref_model, **kw).generate(img)
    assert len(ref) >= 1
    _match(ours, ref)


def test_bad_parameters():
    model, _ = make_pair(TINY, seed=1)
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(model, output_mode="polygons")
    with pytest.raises(ValueError, match="one grid per crop layer"):
        AutomaticMaskGenerator(model, points_per_side=None, point_grids=[], crop_n_layers=0)
    with pytest.raises(ValueError, match="no points in crop layer 2"):
        AutomaticMaskGenerator(
            model, points_per_side=3, crop_n_layers=2, crop_n_points_downscale_factor=2
        )
    with pytest.raises(ValueError, match="mask_chunk_bytes"):
        AutomaticMaskGenerator(model, mask_chunk_bytes=0)
    with pytest.raises(ValueError, match="downscale_factor must be >= 1"):
        AutomaticMaskGenerator(model, points_per_side=4, crop_n_points_downscale_factor=0)


def test_filter_defaults_come_from_the_model(monkeypatch):
    """Unset thresholds take the registered variant's values (segany-lite's are calibrated on
    held-out training images); SAM's for official variants and unknown configs; explicit
    values always win."""
    from segany.registry import SAM_GENERATOR_DEFAULTS, generator_defaults, get_model_spec

    model, _ = make_pair(TINY, seed=1)
    keys = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset")

    def settings(gen):
        return {k: getattr(gen, k) for k in keys}

    assert settings(AutomaticMaskGenerator(model)) == dict(SAM_GENERATOR_DEFAULTS)
    lite = get_model_spec("segany-lite")
    assert lite.generator_defaults, "segany-lite ships calibrated thresholds"
    monkeypatch.setattr(model, "config", lite.config)
    assert settings(AutomaticMaskGenerator(model)) == generator_defaults(model)
    assert settings(AutomaticMaskGenerator(model)) == {
        **SAM_GENERATOR_DEFAULTS,
        **lite.generator_defaults,
    }
    gen = AutomaticMaskGenerator(model, pred_iou_thresh=0.5, stability_score_offset=2.0)
    assert gen.pred_iou_thresh == 0.5 and gen.stability_score_offset == 2.0
    assert gen.stability_score_thresh == generator_defaults(model)["stability_score_thresh"]
    monkeypatch.setattr(model, "config", get_model_spec("vit_b").config)
    assert settings(AutomaticMaskGenerator(model)) == dict(SAM_GENERATOR_DEFAULTS)


def test_count_true_and_stability_score_match_torch_sums():
    """The numpy count (CPU fast path) equals torch's sum over bool, on strided views and
    empty batches too, and the stability score is the ratio of such counts."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 37, 53, generator=g) * 3
    for masks in (logits > 0.5, (logits > -1)[:, ::2, 1::3], (logits > 0)[:0]):
        want = masks.sum((-1, -2))
        got = count_true(masks)
        assert got.dtype == torch.int64 and torch.equal(got, want)
    score = calculate_stability_score(logits, 0.0, 1.0)
    ref = (logits > 1).sum((-1, -2)).double() / (logits > -1).sum((-1, -2)).double()
    torch.testing.assert_close(score.double(), ref, rtol=1e-6, atol=0)
