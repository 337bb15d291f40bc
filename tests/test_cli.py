"""The command line: outputs, and one-line errors with no partial files left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_pair, synthetic_image
from PIL import Image

from segany import Predictor, build_model
from segany.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model, _ = make_pair(TINY, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(90, 120, seed=7)).save(path)
    return path


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("segany: error: ")
    for n in needles:
        assert n in lines[0]


def test_segment_point_writes_best_mask(ckpt, photo, tmp_path, capsys):
    out = tmp_path / "mask.png"
    code, stdout, _ = run(
        [
            "segment",
            photo,
            "--point",
            "40,30",
            "--point",
            "100,70,0",
            "-o",
            out,
            "--checkpoint",
            ckpt,
            "--json",
            tmp_path / "r.json",
            "--overlay",
            tmp_path / "ov.png",
            "--all-masks",
        ],
        capsys,
    )
    assert code == 0 and "wrote" in stdout
    mask = np.array(Image.open(out))
    assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 255}
    # The file holds exactly the best candidate of the library call with the same prompt.
    pred = Predictor(build_model(checkpoint=ckpt))
    pred.set_image(np.array(Image.open(photo)))
    masks, scores, _ = pred.predict(np.array([[40, 30], [100, 70]]), np.array([1, 0]))
    np.testing.assert_array_equal(mask > 0, masks[scores.argmax()])
    report = json.loads((tmp_path / "r.json").read_text())
    obj = report["objects"][0]
    assert obj["best"] == int(scores.argmax())
    assert [c["score"] for c in obj["candidates"]] == pytest.approx(scores.tolist())
    for c in obj["candidates"]:
        assert Path(c["file"]).exists()
    assert np.array(Image.open(tmp_path / "ov.png")).shape == (90, 120, 3)


def test_segment_zoom_in_is_the_zoom_predictor(ckpt, photo, tmp_path, capsys):
    from segany.zoom import ZoomInPredictor

    out = tmp_path / "mask.png"
    args = ["segment", photo, "--point", "40,30", "-o", out, "--checkpoint", ckpt, "--zoom-in"]
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "wrote" in stdout
    zoom = ZoomInPredictor(Predictor(build_model(checkpoint=ckpt)))
    zoom.set_image(np.array(Image.open(photo)))
    masks, scores, _ = zoom.predict(np.array([[40, 30]]), np.array([1]))
    np.testing.assert_array_equal(np.array(Image.open(out)) > 0, masks[scores.argmax()])
    boxes = ["--box", "1,1,20,20", "--box", "30,30,60,60"]
    code, _, err = run(
        ["segment", photo, *boxes, "-o", out, "--checkpoint", ckpt, "--zoom-in"], capsys
    )
    assert_one_line_error(code, err, "--zoom-in")


def test_segment_refine_flag_is_the_predictor_setting(ckpt, photo, tmp_path, capsys):
    # The tiny checkpoint is a ViT (SAM): "auto" leaves it unrefined, "on" refines it.
    image = np.array(Image.open(photo))
    model = build_model(checkpoint=ckpt)
    for flag, refine in (("auto", False), ("on", True), ("off", False)):
        out = tmp_path / f"{flag}.png"
        args = ["segment", photo, "--point", "40,30", "-o", out, "--checkpoint", ckpt]
        code, _, _ = run([*args, "--refine", flag], capsys)
        assert code == 0
        pred = Predictor(model, refine=refine)
        pred.set_image(image)
        masks, scores, _ = pred.predict(np.array([[40, 30]]), np.array([1]))
        np.testing.assert_array_equal(np.array(Image.open(out)) > 0, masks[scores.argmax()])
    assert not np.array_equal(
        np.array(Image.open(tmp_path / "on.png")), np.array(Image.open(tmp_path / "off.png"))
    )
    with pytest.raises(SystemExit):
        main(["segment", str(photo), "--point", "1,2", "-o", str(out), "--refine", "sharp"])


def test_segment_several_boxes_writes_label_map(ckpt, photo, tmp_path, capsys):
    out = tmp_path / "labels.png"
    code, _, _ = run(
        [
            "segment",
            photo,
            "--box",
            "5,5,60,50",
            "--box",
            "50,30,115,85",
            "--single-mask",
            "-o",
            out,
            "--checkpoint",
            ckpt,
        ],
        capsys,
    )
    assert code == 0
    labels = np.array(Image.open(out))
    assert labels.shape == (90, 120)
    assert set(np.unique(labels)) <= {0, 1, 2}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--point", "500,30"], "out of bounds"),
        (["--box", "60,5,10,50"], "x1 >= x0"),
    ],
)
def test_segment_bad_prompt_is_one_line(ckpt, photo, tmp_path, capsys, extra, needle):
    out = tmp_path / "m.png"
    code, _, err = run(["segment", photo, *extra, "-o", out, "--checkpoint", ckpt], capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_segment_usage_errors(photo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(photo), "--point", "1,2,3,4", "-o", str(tmp_path / "m.png")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["segment", str(photo), "--point", "nan,2", "-o", str(tmp_path / "m.png")])


def test_segment_errors_leave_no_file(ckpt, photo, tmp_path, capsys):
    out = tmp_path / "m.png"
    code, _, err = run(
        ["segment", tmp_path / "missing.jpg", "--point", "1,1", "-o", out, "--checkpoint", ckpt],
        capsys,
    )
    assert_one_line_error(code, err, "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(photo.read_bytes()[:200])
    code, _, err = run(["segment", bad, "--point", "1,1", "-o", out, "--checkpoint", ckpt], capsys)
    assert_one_line_error(code, err, "bad.jpg")
    code, _, err = run(
        ["segment", photo, "--point", "1,1", "-o", out, "--checkpoint", tmp_path / "nope.pth"],
        capsys,
    )
    assert_one_line_error(code, err, "nope.pth")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(ckpt.read_bytes()[:5000])
    code, _, err = run(
        ["segment", photo, "--point", "1,1", "-o", out, "--checkpoint", trunc], capsys
    )
    assert_one_line_error(code, err, "trunc.pth")
    code, _, err = run(
        ["segment", photo, "--point", "1,1", "-o", tmp_path / "no" / "m.png", "--checkpoint", ckpt],
        capsys,
    )
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(["segment", photo, "-o", out, "--checkpoint", ckpt], capsys)
    assert_one_line_error(code, err, "--point")
    assert list(tmp_path.glob("*.png")) == [photo]


def test_auto_folder(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_image(64, 80, seed=i)).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    code, stdout, _ = run(
        [
            "auto",
            folder,
            "-o",
            out,
            "--checkpoint",
            ckpt,
            "--points-per-side",
            "4",
            "--pred-iou-thresh",
            "0",
            "--stability-score-thresh",
            "0",
            "--label-map",
            "--polygons",
        ],
        capsys,
    )
    assert code == 0, stdout
    from pycocotools.coco import COCO

    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 2
    assert (out / "im0_overlay.png").exists() and (out / "im1_labels.png").exists()


def test_auto_reports_bad_images_but_keeps_good_ones(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(synthetic_image(64, 80)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code, _, err = run(
        ["auto", folder, "-o", out, "--checkpoint", ckpt, "--points-per-side", "4"], capsys
    )
    assert code == 1
    assert "broken.jpg" in err and "1 of 2 images" in err
    data = json.loads((out / "annotations.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["good.png"]


def test_models_and_convert(ckpt, tmp_path, capsys):
    code, stdout, _ = run(["models"], capsys)
    assert code == 0 and "vit_b" in stdout and "sam_vit_h_4b8939.pth" in stdout
    out = tmp_path / "tiny.safetensors"
    code, _, _ = run(["convert", ckpt, out], capsys)
    assert code == 0
    a, b = build_model(checkpoint=ckpt), build_model(checkpoint=out)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bad_out = tmp_path / "bad.safetensors"
    code, _, err = run(["convert", tmp_path / "missing.pth", bad_out], capsys)
    assert_one_line_error(code, err, "missing.pth")
    assert not bad_out.exists()


def test_entry_point_runs_as_module():
    res = subprocess.run(
        [sys.executable, "-m", "segany", "models"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "vit_l" in res.stdout
