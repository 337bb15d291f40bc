"""Parity with the reference ``segment_anything`` on identical random weights.

Tolerances (stated once, used everywhere): logits and IoU predictions within ``ATOL`` = 1e-4
absolute (plus 1e-4 relative for large logits), thresholded masks IoU >= 0.999 per mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, make_pair, mask_iou, synthetic_image

from segany import Predictor
from segany.modeling.image_encoder import Attention as EncoderAttention
from segany.modeling.transformer import Attention as DecoderAttention

ATOL = 1e-4
RTOL = 1e-4
MIN_MASK_IOU = 0.999


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, (EncoderAttention, DecoderAttention)):
            m.fused = fused


@pytest.mark.parametrize("fused", [True, False])
def test_image_encoder_matches_reference(tiny_pair, fused):
    ours, ref = tiny_pair
    set_fused(ours, fused)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.image_encoder(x), ref.image_encoder(x)
    set_fused(ours, True)
    assert a.shape == b.shape == (2, 32, 10, 10)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_prompt_encoder_matches_reference(tiny_pair):
    ours, ref = tiny_pair
    g = torch.Generator().manual_seed(2)
    pts = torch.rand(3, 4, 2, generator=g) * 160
    labels = torch.tensor([[1, 0, -1, 1], [1, 1, 1, 1], [0, -1, -1, -1]])
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [0, 0, 160, 160], [5, 5, 6, 6]])
    masks = torch.randn(3, 1, 40, 40, generator=g)
    for args in [
        ((pts, labels), None, None),
        (None, boxes, None),
        ((pts, labels), boxes, masks),
        (None, None, masks),
        (None, None, None),
    ]:
        with torch.no_grad():
            sa, da = ours.prompt_encoder(*args)
            sb, db = ref.prompt_encoder(*args)
        torch.testing.assert_close(sa, sb, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(da, db, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        ours.prompt_encoder.get_dense_pe(), ref.prompt_encoder.get_dense_pe()
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_matches_reference(tiny_pair, fused, multimask):
    ours, ref = tiny_pair
    set_fused(ours, fused)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 32, 10, 10, generator=g)
    sparse = torch.randn(5, 3, 32, generator=g)
    dense = torch.randn(5, 32, 10, 10, generator=g)
    pe = ours.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        ma, ia = ours.mask_decoder(emb, pe, sparse, dense, multimask)
        mb, ib = ref.mask_decoder(emb, pe, sparse, dense, multimask)
    set_fused(ours, True)
    assert ma.shape == (5, 3 if multimask else 1, 40, 40)
    torch.testing.assert_close(ma, mb, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ia, ib, atol=ATOL, rtol=RTOL)


PROMPTS = {
    "one_point": dict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1])),
    "points_pos_neg": dict(
        point_coords=np.array([[60.0, 40.0], [150.5, 100.25], [3, 117]]),
        point_labels=np.array([1, 0, 1]),
    ),
    "box": dict(box=np.array([20, 10, 140, 110])),
    "box_and_points": dict(
        box=np.array([20, 10, 140, 110]),
        point_coords=np.array([[60.0, 40.0]]),
        point_labels=np.array([0]),
    ),
    "edge_point": dict(point_coords=np.array([[0.0, 0.0], [180, 120]]), point_labels=[1, 1]),
}


def _compare(out_a, out_b, logits: bool):
    ma, ia, la = out_a
    mb, ib, lb = out_b
    assert ma.shape == mb.shape and ma.dtype == mb.dtype
    np.testing.assert_allclose(ia, ib, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(la, lb, atol=ATOL, rtol=RTOL)
    if logits:
        np.testing.assert_allclose(ma, mb, atol=ATOL, rtol=RTOL)
    else:
        for a, b in zip(ma, mb):
            assert mask_iou(a, b) >= MIN_MASK_IOU


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_matches_reference(tiny_pair, image, prompt, multimask):
    from segment_anything import SamPredictor

    ours, ref = tiny_pair
    pa, pb = Predictor(ours), SamPredictor(ref)
    pa.set_image(image)
    pb.set_image(image)
    torch.testing.assert_close(
        pa.get_image_embedding(), pb.get_image_embedding(), atol=ATOL, rtol=RTOL
    )
    kwargs = PROMPTS[prompt]
    for logits in (False, True):
        a = pa.predict(**kwargs, multimask_output=multimask, return_logits=logits)
        b = pb.predict(**kwargs, multimask_output=multimask, return_logits=logits)
        _compare(a, b, logits)
    # Feed the best low-res logits back as a mask prompt, as interactive tools do.
    best = int(np.argmax(a[1]))
    mask_in = a[2][best][None]
    a2 = pa.predict(**kwargs, mask_input=mask_in, multimask_output=multimask)
    b2 = pb.predict(**kwargs, mask_input=mask_in, multimask_output=multimask)
    _compare(a2, b2, logits=False)


@pytest.mark.parametrize("shape", [(120, 180), (200, 90), (160, 160), (37, 301)])
def test_predictor_image_sizes_and_bgr(tiny_pair, shape):
    from segment_anything import SamPredictor

    ours, ref = tiny_pair
    img = synthetic_image(*shape, seed=shape[0])
    pa, pb = Predictor(ours), SamPredictor(ref)
    for fmt in ("RGB", "BGR"):
        pa.set_image(img, image_format=fmt)
        pb.set_image(img, image_format=fmt)
        assert pa.input_size == tuple(pb.input_size)
        assert pa.original_size == tuple(pb.original_size)
        kwargs = dict(point_coords=np.array([[shape[1] / 3, shape[0] / 2]]), point_labels=[1])
        _compare(pa.predict(**kwargs), pb.predict(**kwargs), logits=False)


def test_predict_torch_batch_matches_reference(tiny_pair, image):
    from segment_anything import SamPredictor

    ours, ref = tiny_pair
    pa, pb = Predictor(ours), SamPredictor(ref)
    pa.set_image(image)
    pb.set_image(image)
    boxes = torch.tensor([[10.0, 10, 100, 80], [50, 30, 160, 120], [0, 0, 180, 120]])
    tb = pb.transform.apply_boxes_torch(boxes, pb.original_size)
    ta = pa.transform.apply_boxes_torch(boxes, pa.original_size)
    torch.testing.assert_close(ta, tb)
    a = pa.predict_torch(None, None, boxes=ta, multimask_output=True)
    b = pb.predict_torch(None, None, boxes=tb, multimask_output=True)
    _compare([t.numpy() for t in a], [t.numpy() for t in b], logits=False)


def test_sam_forward_matches_reference(tiny_pair, image):
    ours, ref = tiny_pair
    from segany.transforms import ResizeLongestSide

    t = ResizeLongestSide(160)
    x = torch.as_tensor(t.apply_image(image)).permute(2, 0, 1).contiguous()
    pts = torch.as_tensor(t.apply_coords(np.array([[[50.0, 60.0]]]), image.shape[:2])).float()
    batch = [
        {
            "image": x,
            "original_size": image.shape[:2],
            "point_coords": pts,
            "point_labels": torch.ones(1, 1),
        },
        {"image": x, "original_size": image.shape[:2], "boxes": torch.tensor([[5.0, 5, 90, 70]])},
    ]
    out_a, out_b = ours(batch, multimask_output=True), ref(batch, multimask_output=True)
    for ra, rb in zip(out_a, out_b):
        torch.testing.assert_close(ra["low_res_logits"], rb["low_res_logits"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            ra["iou_predictions"], rb["iou_predictions"], atol=ATOL, rtol=RTOL
        )
        for a, b in zip(ra["masks"][0], rb["masks"][0]):
            assert mask_iou(a.numpy(), b.numpy()) >= MIN_MASK_IOU


def test_parity_bites_on_different_weights(image):
    """Sanity: the comparison detects a model that differs in one tensor."""
    ours, ref = make_pair(TINY, seed=5)
    with torch.no_grad():
        ours.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.5)
    from segment_anything import SamPredictor

    pa, pb = Predictor(ours), SamPredictor(ref)
    pa.set_image(image)
    pb.set_image(image)
    kw = PROMPTS["one_point"]
    with pytest.raises(AssertionError):
        _compare(pa.predict(**kw), pb.predict(**kw), logits=True)
