"""segany-lite's high-resolution prompt branch (``prompt_encoder.HighResPrompt``).

It draws the clicks as disks and takes the mask input at the mask frame, for the decoder's
stride-4 features. Zero-initialised it changes nothing, so weights made without it load into
a model with it (``init_missing``) and give the same masks; trained, it changes the masks,
batches still equal their items, and the ONNX graph computes it too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_LITE, mask_iou, randomize_, synthetic_image

from segany import Predictor
from segany.checkpoint import CheckpointError, load_state_dict_strict
from segany.modeling import build_sam
from segany.modeling.config import PromptEncoderConfig
from segany.modeling.prompt_encoder import HighResPrompt

BRANCH = "prompt_encoder.high_res_prompt."
LITE_HRP = dataclasses.replace(TINY_LITE, prompt_encoder=PromptEncoderConfig(high_res_prompt=True))
CLICKS = dict(point_coords=np.array([[60.0, 40.0], [100.0, 70.0]]), point_labels=np.array([1, 0]))


def _pair(seed: int = 0):
    """A random tiny segany-lite and the same weights with the branch (zero-initialised)."""
    plain = randomize_(build_sam(TINY_LITE), seed).eval()
    torch.manual_seed(seed)
    with_branch = build_sam(LITE_HRP).eval()
    load_state_dict_strict(with_branch, plain.state_dict(), "plain", [BRANCH])
    return plain, with_branch


def _train_branch(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.high_res_prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_click_maps_are_disks_at_the_clicks():
    branch = HighResPrompt(8, radius=2.0)
    # input pixel (x, y) = (4u + 1.5, 4v + 1.5) is the centre of mask-frame pixel (u, v)
    coords = torch.tensor(
        [[[4 * 5 + 1.5, 4 * 9 + 1.5], [4 * 20 + 1.5, 4 * 3 + 1.5], [0, 0], [9, 9]]]
    )
    labels = torch.tensor([[1, 0, -1, 2]])  # padding and a box corner draw nothing
    maps = branch.click_maps(coords, labels, (24, 32))
    assert maps.shape == (1, 2, 24, 32)
    pos, neg = maps[0, 0], maps[0, 1]
    assert pos[9, 5] == 1 and neg[3, 20] == 1
    assert int(pos.sum()) == int(neg.sum()) == 13  # pixels within 2 of a pixel centre
    ys, xs = pos.nonzero().float().mean(0)
    assert (float(ys), float(xs)) == (9.0, 5.0)
    assert pos[9, 8] == 0 and neg[0, 0] == 0


def test_zero_initialised_branch_changes_nothing():
    plain, with_branch = _pair()
    image = synthetic_image(120, 180, seed=1)
    a, b = Predictor(plain), Predictor(with_branch)
    a.set_image(image)
    b.set_image(image)
    for kwargs in (CLICKS, dict(box=np.array([20, 10, 140, 110]))):
        (ma, ia, la), (mb, ib, lb) = a.predict(**kwargs), b.predict(**kwargs)
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(ia, ib)
        fed = dict(kwargs, mask_input=la[:1], multimask_output=False)
        np.testing.assert_array_equal(a.predict(**fed)[2], b.predict(**fed)[2])


def test_trained_branch_changes_masks_and_batches_equal_items():
    _, model = _pair()
    _train_branch(model)
    image = synthetic_image(120, 180, seed=2)
    pred = Predictor(model, refine=False)  # the decoder itself, unrefined
    pred.set_image(image)
    plain = Predictor(_pair()[1])
    plain.set_image(image)
    low = pred.predict(**CLICKS)[2]
    assert np.abs(low - plain.predict(**CLICKS)[2]).max() > 1e-2
    # the mask input reaches the branch: another mask fed back gives other logits
    fed = dict(CLICKS, multimask_output=False)
    l1 = pred.predict(**fed, mask_input=low[:1])[2]
    l2 = pred.predict(**fed, mask_input=-low[:1])[2]
    assert np.abs(l1 - l2).max() > 1e-2
    # three objects in one call = each alone (clicks and mask inputs differ per object)
    rng = np.random.default_rng(0)
    coords = torch.as_tensor(rng.uniform(0, 120, (3, 2, 2)), dtype=torch.float)
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    masks = torch.as_tensor(rng.normal(0, 5, (3, 1, 32, 32)), dtype=torch.float)
    out = pred.predict_torch(coords, labels, mask_input=masks, return_logits=True)
    for i in range(3):
        one = pred.predict_torch(
            coords[i : i + 1], labels[i : i + 1], mask_input=masks[i : i + 1], return_logits=True
        )
        torch.testing.assert_close(out[0][i : i + 1], one[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1][i : i + 1], one[1], atol=1e-5, rtol=1e-5)


def test_branch_needs_high_res_features():
    with pytest.raises(ValueError, match="use_high_res_features"):
        build_sam(
            dataclasses.replace(TINY, prompt_encoder=PromptEncoderConfig(high_res_prompt=True))
        )


def test_allow_missing_keeps_only_the_named_keys():
    plain, with_branch = _pair()
    fresh = {k: v.clone() for k, v in with_branch.state_dict().items() if k.startswith(BRANCH)}
    assert fresh and all(v.abs().sum() == 0 for k, v in fresh.items() if "conv2" in k)
    for k, v in fresh.items():
        torch.testing.assert_close(with_branch.state_dict()[k], v, rtol=0, atol=0)
    state = plain.state_dict()
    # any other missing key is still an error, and so are prefixes that match nothing
    del state["mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match="iou_token"):
        load_state_dict_strict(build_sam(LITE_HRP), state, "f", [BRANCH])
    with pytest.raises(CheckpointError, match="nothing to keep"):
        load_state_dict_strict(build_sam(TINY_LITE), plain.state_dict(), "f", [BRANCH])


def test_onnx_decoder_computes_the_branch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from segany.export import OnnxRuntimeBackend, export_onnx

    _, model = _pair(1)
    _train_branch(model)
    backend = OnnxRuntimeBackend(export_onnx(model, tmp_path), threads=1)
    image = synthetic_image(120, 180, seed=3)
    ours, onnx = Predictor(model), Predictor(model, backend=backend)
    ours.set_image(image)
    onnx.set_image(image)
    first = ours.predict(**CLICKS)
    for kwargs in (
        CLICKS,
        dict(CLICKS, box=np.array([20, 10, 140, 110])),
        dict(CLICKS, mask_input=first[2][:1], multimask_output=False),
    ):
        (ma, ia, la), (mb, ib, lb) = ours.predict(**kwargs), onnx.predict(**kwargs)
        np.testing.assert_allclose(ia, ib, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(la, lb, atol=1e-3, rtol=1e-3)
        for x, y in zip(ma, mb):
            assert mask_iou(x, y) >= 0.99


def test_one_click_windows_equal_the_whole_frame():
    """Prompts of one click and no mask (first clicks, "segment everything") are computed on
    a window around the click at inference: the same values as convolving the whole frame,
    at the frame's edges and corners, outside it, and for negative and padding labels."""
    torch.manual_seed(0)
    branch = HighResPrompt(8).eval()
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    size = (24, 32)  # mask frame rows x columns; the input frame is 4x that
    xy = [(50.0, 40.0), (0.0, 0.0), (127.0, 95.0), (3.0, 90.0), (126.0, 2.0), (60.0, 1.0),
          (66.0, 94.0), (-9.0, 40.0), (140.0, 120.0), (17.3, 58.9)]  # fmt: skip
    coords = torch.tensor(xy).view(-1, 1, 2)
    labels = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, -1]).view(-1, 1)
    with torch.enable_grad():  # the whole-frame computation
        whole = branch(coords, labels, None, None, size, len(xy)).detach()
    with torch.no_grad():
        windows = branch(coords, labels, None, None, size, len(xy))
    torch.testing.assert_close(windows, whole, rtol=1e-5, atol=1e-5)
    base = torch.randn(1, 8, *size)  # the encoder's stride-4 features, shared by the prompts
    with torch.no_grad():
        with_base = branch(coords, labels, None, None, size, len(xy), base)
        again = branch(coords, labels, None, None, size, len(xy), base)  # kept base + empty
        other = branch(coords, labels, None, None, size, len(xy), base * 2)
    torch.testing.assert_close(with_base, whole + base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, with_base, rtol=0, atol=0)
    torch.testing.assert_close(other, whole + base * 2, rtol=1e-5, atol=1e-5)
    # it is a real window: the click changes the output near it only
    far = windows[0, :, 20:, :4]
    torch.testing.assert_close(far, branch._empty_response(size)[0, :, 20:, :4])
    assert (windows[0] - branch._empty_response(size)[0]).abs().amax() > 0.1


@pytest.mark.parametrize("group_bytes", [1 << 30, 1])
def test_iou_floor_makes_the_branch_for_kept_prompts_only(group_bytes, monkeypatch):
    """With ``iou_floor`` ("segment everything") the branch's B frames are made only for the
    prompts whose masks get upscaled, in one group or prompt by prompt, with the same masks
    and IoUs as the branch made for every prompt (which the decoder then slices)."""
    _, model = _pair(5)
    _train_branch(model)
    model.mask_decoder.group_bytes = group_bytes
    p = Predictor(model)
    p.set_image(synthetic_image(96, 128, seed=2))
    g = torch.Generator().manual_seed(4)
    pts = torch.rand(9, 1, 2, generator=g) * torch.tensor([128.0, 96.0])
    labels = torch.ones(9, 1, dtype=torch.int)
    branch = model.prompt_encoder.high_res_prompt
    seen: list[int] = []
    forward = type(branch).forward

    def counting(self, coords, *args, **kw):
        seen.append(0 if coords is None else coords.shape[0])
        return forward(self, coords, *args, **kw)

    with torch.no_grad():
        low_all, iou_all = p.decode_low_res((pts, labels), None, None, True)
        floor = float(iou_all.max(1).values.median())
        monkeypatch.setattr(type(branch), "forward", counting)
        low, iou = p.decode_low_res((pts, labels), None, None, True, iou_floor=floor)
    kept = (iou_all > floor).any(1)
    assert 0 < int(kept.sum()) < 9
    assert sum(seen) == int(kept.sum())  # not 9
    torch.testing.assert_close(iou, iou_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low[kept], low_all[kept], atol=1e-4, rtol=1e-4)
    assert not low[~kept].any()
    seen.clear()
    model.fast_high_res_prompt = False  # switched off (set_fast_paths): every prompt's frames
    with torch.no_grad():
        low_off, iou_off = p.decode_low_res((pts, labels), None, None, True, iou_floor=floor)
    assert sum(seen) == 9
    torch.testing.assert_close(low_off, low, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou_off, iou, atol=1e-5, rtol=1e-5)
