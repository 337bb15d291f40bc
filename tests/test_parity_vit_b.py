"""Parity with the reference ``SamPredictor`` at the real ViT-B size (random weights).

Slow (two 1024 x 1024 ViT-B encoder passes, about a minute each on two CPU cores), so excluded
from the default run; run with ``pytest -m slow tests/test_parity_vit_b.py``. Same tolerances
as ``test_parity.py``: logits and IoU predictions within 1e-4 (absolute plus relative), masks
IoU >= 0.999.

Weights are random: std ``ENCODER_SCALE`` = 0.02 in the image encoder (the usual ViT
initialisation; official SAM weights are of that order) and ``DECODER_SCALE`` = 0.1 in the
prompt encoder and mask decoder, which gives logits of a realistic size (std ~4, max ~15) so
that the 1e-4 tolerance is strict. With the tiny tests' 0.2 everywhere, twelve 768-wide blocks
amplify float32 rounding so much that the *reference itself* is ~2e-2 away from its own
float64 result (segany equally: mean |error| 1.77e-3 for both), which no implementation can
meet at 1e-4; at 0.02 both are within ~4e-6 of float64. With 0.02 in the decoder the logits
would be ~1e-2 and an absolute 1e-4 would hardly bite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pair, mask_iou, randomize_, synthetic_image

from segany import Predictor, get_model_spec

pytestmark = pytest.mark.slow

ATOL = 1e-4
RTOL = 1e-4
MIN_MASK_IOU = 0.999

ENCODER_SCALE = 0.02
DECODER_SCALE = 0.1
IMAGE_H, IMAGE_W = 480, 640

PROMPTS = {
    "one_point": dict(point_coords=np.array([[320.0, 240.0]]), point_labels=np.array([1])),
    "box": dict(box=np.array([100.0, 80.0, 420.0, 400.0])),
    "points_and_box": dict(
        point_coords=np.array([[250.0, 200.0], [600.0, 50.0]]),
        point_labels=np.array([1, 0]),
        box=np.array([100.0, 80.0, 420.0, 400.0]),
    ),
}


@pytest.fixture(scope="module")
def predictors():
    from segment_anything import SamPredictor

    config = get_model_spec("vit_b").config
    ours, ref = make_pair(config, scale=ENCODER_SCALE)
    randomize_(ours.prompt_encoder, seed=1, scale=DECODER_SCALE)
    randomize_(ours.mask_decoder, seed=2, scale=DECODER_SCALE)
    ref.load_state_dict(ours.state_dict(), strict=True)
    image = synthetic_image(IMAGE_H, IMAGE_W, seed=4)
    pa, pb = Predictor(ours), SamPredictor(ref)
    pa.set_image(image)
    pb.set_image(image)
    return pa, pb


def test_vit_b_embedding_matches_reference(predictors):
    pa, pb = predictors
    a, b = pa.get_image_embedding(), pb.get_image_embedding()
    assert a.shape == b.shape == (1, 256, 64, 64)
    assert pa.input_size == tuple(pb.input_size) == (768, 1024)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_vit_b_predictions_match_reference(predictors, prompt, multimask):
    pa, pb = predictors
    kwargs = PROMPTS[prompt]
    ma, ia, la = pa.predict(**kwargs, multimask_output=multimask)
    mb, ib, lb = pb.predict(**kwargs, multimask_output=multimask)
    assert ma.shape == mb.shape == (3 if multimask else 1, IMAGE_H, IMAGE_W)
    assert la.shape == (3 if multimask else 1, 256, 256)
    np.testing.assert_allclose(ia, ib, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(la, lb, atol=ATOL, rtol=RTOL)
    for a, b in zip(ma, mb):
        assert mask_iou(a, b) >= MIN_MASK_IOU
    # Non-trivial masks and logits, so that the checks bite (an empty pair has IoU 1).
    assert any(0.01 < m.mean() < 0.99 for m in mb)
    assert np.abs(lb).max() > 1.0
