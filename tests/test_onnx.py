"""ONNX export + ONNX Runtime give the masks of the PyTorch model (tiny random config)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, mask_iou, randomize_

from segany import AutomaticMaskGenerator, Predictor
from segany.modeling import build_sam

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from segany.export import OnnxRuntimeBackend, export_onnx

    model = randomize_(build_sam(TINY), 0).eval()
    out = export_onnx(model, tmp_path_factory.mktemp("onnx"))
    assert (out / "encoder.onnx").is_file() and (out / "decoder.onnx").is_file()
    return model, OnnxRuntimeBackend(out, threads=1)


def _check(a, b):
    ma, ia, la = a
    mb, ib, lb = b
    assert ma.shape == mb.shape
    np.testing.assert_allclose(ia, ib, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(la, lb, atol=1e-3, rtol=1e-3)
    for x, y in zip(ma.reshape(-1, *ma.shape[-2:]), mb.reshape(-1, *mb.shape[-2:])):
        assert mask_iou(x, y) >= 0.99


PROMPTS = [
    dict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[60.0, 40.0], [150, 100], [3, 7]]), point_labels=[1, 0, 1]),
    dict(box=np.array([20, 10, 140, 110])),
    dict(box=np.array([20, 10, 140, 110]), point_coords=np.array([[60.0, 40]]), point_labels=[0]),
    # dynamic counts: 3 objects of 2 points, 4 boxes
    dict(
        point_coords=np.random.default_rng(0).uniform(0, 110, (3, 2, 2)),
        point_labels=np.ones((3, 2)),
    ),
    dict(box=np.array([[0, 0, 50, 50], [10, 20, 170, 110], [5, 5, 6, 6], [0, 0, 180, 120]])),
]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_onnxruntime_predictor_matches_torch(exported, image, i):
    model, backend = exported
    pt, ort = Predictor(model), Predictor(model, backend=backend)
    pt.set_image(image)
    ort.set_image(image)
    torch.testing.assert_close(ort.features, pt.features, atol=1e-4, rtol=1e-4)
    for multimask in (True, False):
        a = ort.predict(**PROMPTS[i], multimask_output=multimask)
        b = pt.predict(**PROMPTS[i], multimask_output=multimask)
        _check(a, b)
    mask_in = b[2][:1] if b[2].ndim == 3 else b[2][:, :1]
    kw = dict(PROMPTS[i], mask_input=mask_in)
    _check(ort.predict(**kw), pt.predict(**kw))


def test_onnxruntime_automatic_generator(exported, image):
    model, backend = exported
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    a = AutomaticMaskGenerator(model, backend=backend, **kw).generate(image)
    b = AutomaticMaskGenerator(model, **kw).generate(image)
    assert len(a) == len(b) > 0
    for x, y in zip(
        sorted(a, key=lambda r: r["point_coords"]), sorted(b, key=lambda r: r["point_coords"])
    ):
        assert mask_iou(x["segmentation"], y["segmentation"]) >= 0.99


def test_onnxruntime_needs_a_prompt(exported, image):
    model, backend = exported
    p = Predictor(model, backend=backend)
    p.set_image(image)
    with pytest.raises(ValueError, match="point or box"):
        p.predict(mask_input=np.zeros((1, 40, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="backend"):
        Predictor(model, backend="tensorrt")


def test_high_res_decoder_exports(tmp_path, image):
    """segany-lite's decoder takes the encoder's high-res features as extra graph inputs."""
    from segany.export import OnnxRuntimeBackend, export_onnx
    from segany.modeling.config import LiteEncoderConfig, MaskDecoderConfig, SamConfig

    config = SamConfig(
        image_encoder=LiteEncoderConfig(
            backbone="lite0", img_size=128, out_chans=32, neck_blocks=1
        ),
        mask_decoder=MaskDecoderConfig(
            transformer_mlp_dim=64, iou_head_hidden_dim=32, use_high_res_features=True
        ),
        pixel_mean=(127.0, 127.0, 127.0),
        pixel_std=(128.0, 128.0, 128.0),
    )
    model = randomize_(build_sam(config), 1).eval()
    backend = OnnxRuntimeBackend(export_onnx(model, tmp_path), threads=1)
    # The "same" padding must export as Pad (folded into Conv), not as slice assignments
    # (ScatterND + Transposes: 5x slower in ONNX Runtime), and batch norms fold into convs.
    import onnx as onnx_lib
    import onnxruntime as ort

    ops = {n.op_type for n in onnx_lib.load(str(tmp_path / "encoder.onnx")).graph.node}
    assert not ops & {"ScatterND", "Transpose"}, ops
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx_lib.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "BatchNormalization" not in ops, ops
    ours, onnx = Predictor(model), Predictor(model, backend=backend)
    ours.set_image(image)
    onnx.set_image(image)
    for kwargs in (PROMPTS[1], PROMPTS[2], PROMPTS[4]):
        _check(ours.predict(**kwargs), onnx.predict(**kwargs))
