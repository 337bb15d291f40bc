"""Predictor invariants and input validation on the TINY model.

Invariants: a batch of prompts equals the same prompts one by one; a saved and reloaded
embedding gives the same masks as a fresh one; a second ``set_image`` replaces the first.
Bad input: every malformed prompt or image is a ``ValueError`` that says what was wrong.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY, make_pair, synthetic_image

from segany import Predictor, build_sam, save_safetensors

#: Batched vs one-by-one decoding: the same arithmetic up to float summation order.
BATCH_ATOL = 1e-5
#: Against the reference implementation (as in test_parity.py).
REF_ATOL = 1e-4

H, W = 120, 180  # the `image` fixture

BOXES = np.array([[10.0, 10, 100, 80], [50, 30, 160, 119], [0, 0, 180, 120], [70.5, 20.25, 90, 60]])
POINT_SETS = [
    np.array([[60.0, 40.0]]),
    np.array([[60.0, 40.0], [150.5, 100.25], [3, 117]]),
    np.array([[120.0, 20.0], [30.0, 90.0]]),
]
LABEL_SETS = [np.array([1]), np.array([1, 0, 1]), np.array([0, 1])]


@pytest.fixture()
def predictor(tiny_pair, image) -> Predictor:
    p = Predictor(tiny_pair[0])
    p.set_image(image)
    return p


def assert_same(batched, single, *, exact_masks: bool = True) -> None:
    """One object's ``(masks, iou, low_res)`` from a batch equals its one-by-one result."""
    mb, ib, lb = batched
    ms, is_, ls = single
    assert mb.shape == ms.shape and mb.dtype == ms.dtype
    np.testing.assert_allclose(ib, is_, atol=BATCH_ATOL, rtol=0)
    np.testing.assert_allclose(lb, ls, atol=BATCH_ATOL, rtol=0)
    if exact_masks:
        np.testing.assert_array_equal(mb, ms)


# ---------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("multimask", [True, False])
def test_batched_boxes_equal_one_by_one(predictor, multimask):
    masks, iou, low = predictor.predict_batch(boxes=BOXES, multimask_output=multimask)
    c = 3 if multimask else 1
    assert masks.shape == (4, c, H, W) and masks.dtype == bool
    assert iou.shape == (4, c) and low.shape == (4, c, 40, 40)
    for i, box in enumerate(BOXES):
        single = predictor.predict(box=box, multimask_output=multimask)
        assert_same((masks[i], iou[i], low[i]), single)
    # The objects really differ (so equality above is not trivially satisfied).
    assert not np.allclose(low[0], low[1])


def test_predict_with_box_array_has_leading_batch_axis(predictor):
    masks, iou, low = predictor.predict(box=BOXES)
    assert masks.shape == (4, 3, H, W) and iou.shape == (4, 3) and low.shape == (4, 3, 40, 40)
    ref = predictor.predict_batch(boxes=BOXES)
    for a, b in zip((masks, iou, low), ref):
        np.testing.assert_array_equal(a, b)
    # One box, as 4 or 1 x 4: no batch axis (the reference SamPredictor's shapes).
    for box in (BOXES[1], BOXES[1:2]):
        m, i, lo = predictor.predict(box=box)
        assert m.shape == (3, H, W) and i.shape == (3,) and lo.shape == (3, 40, 40)
        assert_same((masks[1], iou[1], low[1]), (m, i, lo))


def test_return_logits_in_batch(predictor):
    logits, _, _ = predictor.predict_batch(boxes=BOXES[:2], return_logits=True)
    masks, _, _ = predictor.predict_batch(boxes=BOXES[:2])
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0.0, masks)


@pytest.mark.parametrize("multimask", [True, False])
def test_equal_size_point_sets_batched_equal_one_by_one(predictor, multimask):
    coords = np.stack([POINT_SETS[1], POINT_SETS[1][::-1], POINT_SETS[1] * 0.5])  # B x N x 2
    labels = np.stack([LABEL_SETS[1], LABEL_SETS[1][::-1], np.ones(3, int)])  # B x N
    out_batch = predictor.predict_batch(coords, labels, multimask_output=multimask)
    out_predict = predictor.predict(coords, labels, multimask_output=multimask)  # B x N x 2
    for a, b in zip(out_batch, out_predict):
        np.testing.assert_array_equal(a, b)
    for i in range(3):
        single = predictor.predict(coords[i], labels[i], multimask_output=multimask)
        assert_same(tuple(o[i] for o in out_batch), single)


def _padded(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Point set ``i`` padded to the longest set with (0, 0) points of label -1."""
    n = max(len(c) for c in POINT_SETS)
    coords = np.zeros((n, 2))
    labels = -np.ones(n, dtype=int)
    coords[: len(POINT_SETS[i])] = POINT_SETS[i]
    labels[: len(LABEL_SETS[i])] = LABEL_SETS[i]
    return coords, labels


@pytest.mark.parametrize("multimask", [True, False])
def test_ragged_point_sets_equal_one_by_one(predictor, multimask):
    """A list of point sets of different sizes is decoded in groups of equal size, so each
    object gets exactly its own ``predict`` result (no padding tokens)."""
    out = predictor.predict_batch(POINT_SETS, LABEL_SETS, multimask_output=multimask)
    assert out[0].shape == (3, 3 if multimask else 1, H, W)
    for i in range(3):
        single = predictor.predict(POINT_SETS[i], LABEL_SETS[i], multimask_output=multimask)
        assert_same(tuple(o[i] for o in out), single)
    # With boxes and mask inputs sliced along the same groups.
    boxes = BOXES[:3]
    out = predictor.predict_batch(POINT_SETS, LABEL_SETS, boxes)
    for i in range(3):
        assert_same(
            tuple(o[i] for o in out), predictor.predict(POINT_SETS[i], LABEL_SETS[i], box=boxes[i])
        )


def test_explicit_padding_matches_the_reference(predictor, tiny_pair):
    """A ``B x N x 2`` array whose shorter sets are padded with label -1 points is decoded as
    given, like the reference ``SamPredictor`` fed the same arrays."""
    from segment_anything import SamPredictor

    padded = [_padded(i) for i in range(3)]
    coords = np.stack([c for c, _ in padded])
    labels = np.stack([lab for _, lab in padded])
    out = predictor.predict_batch(coords, labels)
    ref = SamPredictor(tiny_pair[1])
    ref.features = predictor.get_image_embedding()  # same embedding: compare decoders only
    ref.original_size, ref.input_size = predictor.original_size, predictor.input_size
    ref.is_image_set = True
    for i in range(3):
        mine = tuple(o[i] for o in out)
        assert_same(mine, predictor.predict(coords[i], labels[i]))
        tc = ref.transform.apply_coords(coords[i], ref.original_size)
        _, ri, rl = ref.predict_torch(
            torch.as_tensor(tc, dtype=torch.float)[None], torch.as_tensor(labels[i])[None]
        )
        np.testing.assert_allclose(mine[1], ri[0].numpy(), atol=REF_ATOL, rtol=REF_ATOL)
        np.testing.assert_allclose(mine[2], rl[0].numpy(), atol=REF_ATOL, rtol=REF_ATOL)


def test_padding_points_is_not_free(predictor):
    """Documents SAM's behaviour: a -1 point is not ignored by the mask decoder (it becomes a
    ``not_a_point_embed`` token), which is why ragged point sets are grouped, not padded."""
    coords, labels = _padded(0)
    padded = predictor.predict(coords, labels)
    alone = predictor.predict(POINT_SETS[0], LABEL_SETS[0])
    assert np.abs(padded[2] - alone[2]).max() > 1e-3


@pytest.mark.parametrize("multimask", [True, False])
def test_boxes_with_points_per_object_equal_one_by_one(predictor, multimask):
    boxes = BOXES[:3]
    coords = np.stack([POINT_SETS[2], POINT_SETS[2] + 5, POINT_SETS[2] - 5])
    labels = np.stack([LABEL_SETS[2], [1, 1], [0, 0]])
    out = predictor.predict_batch(coords, labels, boxes, multimask_output=multimask)
    for i in range(3):
        single = predictor.predict(coords[i], labels[i], box=boxes[i], multimask_output=multimask)
        assert_same(tuple(o[i] for o in out), single)
    # The box changes the result (so it was really used per object).
    no_box = predictor.predict(coords[0], labels[0], multimask_output=multimask)
    assert not np.allclose(out[2][0], no_box[2], atol=1e-3)


def test_boxes_with_mask_inputs_equal_one_by_one(predictor):
    _, iou, low = predictor.predict_batch(boxes=BOXES[:3])
    mask_in = np.stack([low[i, int(np.argmax(iou[i]))][None] for i in range(3)])  # B x 1 x h x w
    out = predictor.predict_batch(boxes=BOXES[:3], mask_input=mask_in)
    for i in range(3):
        assert_same(
            tuple(o[i] for o in out), predictor.predict(box=BOXES[i], mask_input=mask_in[i])
        )


def test_mask_input_with_and_without_batch_axis(predictor):
    """``1 x h x w`` and ``1 x 1 x h x w`` are the same prompt; ``h x w`` is refused."""
    _, iou, low = predictor.predict(box=BOXES[0])
    m = low[int(np.argmax(iou))]
    a = predictor.predict(box=BOXES[0], mask_input=m[None])
    b = predictor.predict(box=BOXES[0], mask_input=m[None, None])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"mask_input must be B x 1 x 40 x 40"):
        predictor.predict(box=BOXES[0], mask_input=m)


# ---------------------------------------------------------------------------------- embeddings
def _same_weights_model(model):
    twin = build_sam(TINY)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_saved_embedding_equals_fresh_one(tiny_pair, image, tmp_path):
    model = tiny_pair[0]
    fresh = Predictor(model)
    fresh.set_image(image)
    path = tmp_path / "emb.safetensors"
    fresh.save_embedding(path)
    assert os.listdir(tmp_path) == ["emb.safetensors"]  # no temporary file left

    loaded = Predictor(_same_weights_model(model))  # new predictor, new model object
    loaded.load_embedding(path)
    assert loaded.is_image_set
    assert loaded.original_size == fresh.original_size == (H, W)
    assert loaded.input_size == fresh.input_size
    assert torch.equal(loaded.get_image_embedding(), fresh.get_image_embedding())
    prompts = [
        dict(point_coords=POINT_SETS[1], point_labels=LABEL_SETS[1]),
        dict(box=BOXES),
        dict(box=BOXES[0], multimask_output=False, return_logits=True),
    ]
    for kw in prompts:
        for a, b in zip(loaded.predict(**kw), fresh.predict(**kw)):
            np.testing.assert_array_equal(a, b)


def test_load_embedding_replaces_current_image(tiny_pair, image, tmp_path):
    p = Predictor(tiny_pair[0])
    p.set_image(image)
    path = tmp_path / "emb.safetensors"
    p.save_embedding(path)
    expected = p.predict(box=BOXES[0])
    p.set_image(synthetic_image(64, 200, seed=3))
    p.load_embedding(path)
    assert p.original_size == (H, W)
    for a, b in zip(p.predict(box=BOXES[0]), expected):
        np.testing.assert_array_equal(a, b)


def test_embedding_from_other_weights_is_refused(predictor, tmp_path):
    path = tmp_path / "emb.safetensors"
    predictor.save_embedding(path)
    other = Predictor(make_pair(TINY, seed=7)[0])
    with pytest.raises(ValueError, match="different model weights"):
        other.load_embedding(path)
    assert not other.is_image_set


def test_fingerprint_sees_a_change_deep_inside_the_encoder(predictor):
    before = predictor.model_fingerprint()
    block = predictor.model.image_encoder.blocks[0].attn.qkv.weight
    with torch.no_grad():
        block[0, 0] += 1.0
    try:
        assert predictor.model_fingerprint() != before
    finally:
        with torch.no_grad():
            block[0, 0] -= 1.0


def _corrupt_files(tmp_path, predictor):
    good = tmp_path / "good.safetensors"
    predictor.save_embedding(good)
    data = good.read_bytes()
    files = {
        "missing": tmp_path / "missing.safetensors",
        "empty": tmp_path / "empty.safetensors",
        "random": tmp_path / "random.safetensors",
        "text": tmp_path / "text.safetensors",
        "truncated": tmp_path / "truncated.safetensors",
        "weights": tmp_path / "weights.safetensors",
        "no_metadata": tmp_path / "no_meta.safetensors",
        "bad_metadata": tmp_path / "bad_meta.safetensors",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 999, np.uint8).tobytes())
    files["text"].write_text("not an embedding")
    files["truncated"].write_bytes(data[: len(data) // 2])
    save_safetensors(predictor.model, files["weights"], config=TINY)  # a checkpoint instead
    features = {"features": predictor.get_image_embedding().contiguous()}
    save_safetensors(features, files["no_metadata"])
    save_safetensors(features, files["bad_metadata"], extra_metadata={"segany_embedding": "{x"})
    fp = predictor.model_fingerprint()
    for name, sizes in {
        "short_size": ([H], [64, 64]),
        "zero_size": ([0, W], [64, 64]),
        "float_size": ([H, W], [64.5, 64]),
    }.items():
        files[name] = tmp_path / f"{name}.safetensors"
        meta = {"original_size": sizes[0], "input_size": sizes[1], "model": fp}
        save_safetensors(
            features, files[name], extra_metadata={"segany_embedding": json.dumps(meta)}
        )
    return files


def test_corrupt_or_missing_embedding_files(predictor, tmp_path):
    files = _corrupt_files(tmp_path, predictor)
    p = Predictor(predictor.model)
    for name, path in files.items():
        with pytest.raises(ValueError) as info:
            p.load_embedding(path)
        assert str(path) in str(info.value), name
        assert not p.is_image_set, name


def test_save_embedding_requires_image(tiny_pair, tmp_path):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(tiny_pair[0]).save_embedding(tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- image state
def test_second_set_image_replaces_first(tiny_pair, image):
    model = tiny_pair[0]
    other = synthetic_image(90, 140, seed=9)
    p = Predictor(model)
    p.set_image(image)
    first = p.predict(box=[10, 10, 80, 70])
    p.set_image(other)
    second = p.predict(box=[10, 10, 80, 70])
    fresh = Predictor(model)
    fresh.set_image(other)
    expected = fresh.predict(box=[10, 10, 80, 70])
    assert p.original_size == (90, 140)
    for a, b in zip(second, expected):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape[1:] == (H, W)
    assert not np.allclose(first[2], second[2])


def test_same_image_twice_is_deterministic(predictor, image):
    a = predictor.predict(box=BOXES[0])
    emb = predictor.get_image_embedding().clone()
    predictor.set_image(image)
    assert torch.equal(emb, predictor.get_image_embedding())
    for x, y in zip(a, predictor.predict(box=BOXES[0])):
        np.testing.assert_array_equal(x, y)


def test_reset_image_then_predict_fails(predictor):
    predictor.predict(box=BOXES[0])
    predictor.reset_image()
    assert not predictor.is_image_set
    for call in (
        lambda: predictor.predict(box=BOXES[0]),
        lambda: predictor.predict_batch(boxes=BOXES),
        predictor.get_image_embedding,
    ):
        with pytest.raises(RuntimeError, match="set_image"):
            call()


def test_predict_before_any_image_fails(tiny_pair):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(tiny_pair[0]).predict(point_coords=[[1, 1]], point_labels=[1])


# ---------------------------------------------------------------------------------- bad prompts
P1, L1 = np.array([[60.0, 40.0]]), np.array([1])

BAD_PROMPTS = {
    "point_negative_x": (dict(point_coords=[[-1.0, 40]], point_labels=[1]), "out of bounds"),
    "point_negative_y": (dict(point_coords=[[60.0, -0.5]], point_labels=[1]), "out of bounds"),
    "point_beyond_width": (dict(point_coords=[[W + 1, 40]], point_labels=[1]), "out of bounds"),
    "point_beyond_height": (dict(point_coords=[[60, H + 1]], point_labels=[1]), "out of bounds"),
    "point_in_batch_oob": (
        dict(point_coords=np.array([[[1.0, 1]], [[1e6, 1]]]), point_labels=[[1], [1]]),
        "out of bounds",
    ),
    "point_nan": (dict(point_coords=[[np.nan, 40]], point_labels=[1]), "NaN or infinite"),
    "point_inf": (dict(point_coords=[[60, np.inf]], point_labels=[1]), "NaN or infinite"),
    "box_nan": (dict(box=[10, 10, np.nan, 50]), "NaN or infinite"),
    "box_inf": (dict(box=[10, 10, 50, np.inf]), "NaN or infinite"),
    "box_negative": (dict(box=[-5, 10, 50, 60]), "out of bounds"),
    "box_beyond_image": (dict(box=[5, 10, W + 10, 60]), "out of bounds"),
    "mask_nan": (dict(box=[5, 10, 50, 60], mask_input=np.full((1, 40, 40), np.nan)), "NaN"),
    "mask_inf": (dict(mask_input=np.full((1, 1, 40, 40), -np.inf)), "NaN or infinite"),
    "points_n_by_3": (dict(point_coords=[[1.0, 2, 3]], point_labels=[1]), r"N x 2"),
    "points_flat": (dict(point_coords=[60.0, 40], point_labels=[1]), r"N x 2"),
    "points_scalar": (dict(point_coords=5.0, point_labels=[1]), r"N x 2"),
    "points_4d": (
        dict(point_coords=np.zeros((1, 1, 1, 2)), point_labels=np.ones((1, 1, 1))),
        r"N x 2",
    ),
    "labels_too_many": (dict(point_coords=P1, point_labels=[1, 1]), "does not match"),
    "labels_too_few": (dict(point_coords=[[1, 1], [2, 2]], point_labels=[1]), "does not match"),
    "labels_scalar": (dict(point_coords=P1, point_labels=1), "point_labels"),
    "label_value_2": (dict(point_coords=P1, point_labels=[2]), r"1 \(positive\), 0"),
    "label_value_half": (dict(point_coords=P1, point_labels=[0.5]), r"1 \(positive\), 0"),
    "labels_without_points": (dict(point_labels=L1), "given together"),
    "points_without_labels": (dict(point_coords=P1), "given together"),
    "box_3_numbers": (dict(box=[1, 2, 3]), r"B x 4"),
    "box_5_numbers": (dict(box=[[1, 2, 3, 4, 5]]), r"B x 4"),
    "box_x_reversed": (dict(box=[100, 10, 50, 60]), "x1 >= x0"),
    "box_y_reversed": (dict(box=[10, 60, 50, 10]), "y1 >= y0"),
    "boxes_empty": (dict(box=np.zeros((0, 4))), "empty prompt batch"),
    "mask_2d": (dict(mask_input=np.zeros((40, 40))), r"B x 1 x 40 x 40"),
    "mask_wrong_size": (dict(mask_input=np.zeros((1, 256, 256))), r"B x 1 x 40 x 40"),
    "mask_two_channels": (dict(mask_input=np.zeros((1, 2, 40, 40))), r"B x 1 x 40 x 40"),
    "boxes_vs_point_sets": (
        dict(box=BOXES[:2], point_coords=np.zeros((3, 1, 2)) + 5, point_labels=np.ones((3, 1))),
        r"batch sizes differ: points=3, boxes=2",
    ),
    "boxes_vs_one_point_set": (
        dict(box=BOXES[:2], point_coords=P1, point_labels=L1),
        "batch sizes differ",
    ),
    "boxes_vs_masks": (
        dict(box=BOXES[:2], mask_input=np.zeros((3, 1, 40, 40))),
        r"batch sizes differ: boxes=2, mask_input=3",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_PROMPTS))
def test_bad_prompt_is_a_clear_value_error(predictor, name):
    kwargs, message = BAD_PROMPTS[name]
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_points_on_the_border_are_accepted(predictor):
    """Bounds are inclusive: (0, 0) and (W, H) are valid, as in the reference."""
    masks, _, _ = predictor.predict(point_coords=[[0, 0], [W, H]], point_labels=[1, 1])
    assert masks.shape == (3, H, W)
    predictor.predict(box=[0, 0, W, H])


def test_padding_points_may_lie_anywhere(predictor):
    """Coordinates of label -1 points are not used, so they are not bounds-checked."""
    a = predictor.predict([[60.0, 40.0], [-100.0, 1e5]], [1, -1])
    b = predictor.predict([[60.0, 40.0], [0.0, 0.0]], [1, -1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_bad_ragged_point_sets(predictor):
    with pytest.raises(ValueError, match="2 point sets but 1 label sets"):
        predictor.predict_batch(POINT_SETS[:2], LABEL_SETS[:1])
    with pytest.raises(ValueError, match="does not match"):
        predictor.predict_batch(POINT_SETS[:2], LABEL_SETS[1:3])
    with pytest.raises(ValueError, match="one label array per point set"):
        predictor.predict_batch(POINT_SETS[:2], 1)
    with pytest.raises(ValueError, match=r"N x 2 \(x, y\) per object"):
        predictor.predict_batch([POINT_SETS[0], np.zeros((2, 3))], LABEL_SETS[:2])


def test_predict_torch_requires_labels(predictor):
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict_torch(torch.zeros(1, 1, 2), None)


# ---------------------------------------------------------------------------------- bad images
BAD_IMAGES = {
    "float32": np.zeros((H, W, 3), np.float32),
    "float64_0_1": np.full((H, W, 3), 0.5),
    "uint16": np.zeros((H, W, 3), np.uint16),
    "int64": np.zeros((H, W, 3), np.int64),
    "bool": np.zeros((H, W, 3), bool),
    "channels_first": np.zeros((3, H, W), np.uint8),
    "two_channels": np.zeros((H, W, 2), np.uint8),
    "five_channels": np.zeros((H, W, 5), np.uint8),
    "batch_axis": np.zeros((1, H, W, 3), np.uint8),
    "one_dim": np.zeros(H * W * 3, np.uint8),
    "empty": np.zeros((0, W, 3), np.uint8),
    "nested_list": [[[0, 0, 0]]],
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_set_image_refuses_bad_arrays(tiny_pair, name):
    p = Predictor(tiny_pair[0])
    with pytest.raises(ValueError, match="image"):
        p.set_image(BAD_IMAGES[name])
    assert not p.is_image_set


@pytest.mark.parametrize("fmt", ["RGBA", "rgb", "GRAY", ""])
def test_set_image_refuses_unknown_format(tiny_pair, image, fmt):
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        Predictor(tiny_pair[0]).set_image(image, image_format=fmt)


def test_bgr_equals_rgb_of_reversed_channels(tiny_pair, image):
    a, b = Predictor(tiny_pair[0]), Predictor(tiny_pair[0])
    a.set_image(image)
    b.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert torch.equal(a.get_image_embedding(), b.get_image_embedding())
