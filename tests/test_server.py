"""HTTP server: every endpoint and error path with the real app and a tiny random model.

The server's answers are checked against the library (Predictor, AutomaticMaskGenerator,
segany.masks) on the same weights, so the API adds transport, never different masks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import time
import warnings

import httpx
import numpy as np
import pytest
import torch
from conftest import TINY, randomize_, synthetic_image
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi")

with warnings.catch_warnings():
    # Starlette prefers httpx2 for its test client; httpx (pinned here) still works.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

from segany import AutomaticMaskGenerator, Predictor  # noqa: E402
from segany.masks import decode_rle, encode_rle  # noqa: E402
from segany.modeling import build_sam  # noqa: E402
from segany.server import ServerSettings, create_app  # noqa: E402
from segany.server.cache import EmbeddingCache  # noqa: E402
from segany.server.runner import ModelRunner, ServerBusy  # noqa: E402

H, W = 120, 180


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomize_(build_sam(TINY), seed=5).eval()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_image(H, W, seed=1)


@pytest.fixture(scope="module")
def png(image) -> bytes:
    return png_bytes(image)


def make_client(model, **settings) -> TestClient:
    defaults = {"max_points_per_side": 8, "max_crop_layers": 1}
    return TestClient(create_app(model, ServerSettings(**{**defaults, **settings})))


@pytest.fixture()
def client(model):
    with make_client(model) as c:
        yield c


def upload(client: TestClient, data: bytes, ctype: str = "image/png", name: str = "a.png"):
    return client.post("/v1/images", files={"file": (name, data, ctype)})


@pytest.fixture()
def image_id(client, png) -> str:
    r = upload(client, png)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else json.dumps(detail)
    for n in needles:
        assert n in text, text
    assert "Traceback" not in text


# ----------------------------------------------------------------------------- images
def test_upload_returns_content_hash_and_encodes_once(client, png, model, monkeypatch):
    calls = []
    real = model.image_encoder.forward
    monkeypatch.setattr(model.image_encoder, "forward", lambda x: calls.append(1) or real(x))
    r = upload(client, png, name="photo.png")
    assert r.status_code == 200
    info = r.json()
    assert info["id"] == hashlib.sha256(png).hexdigest()
    assert (info["width"], info["height"], info["file_name"]) == (W, H, "photo.png")
    assert info["cached"] is False and info["encode_ms"] > 0
    again = upload(client, png, name="other.png").json()
    assert again["cached"] is True and again["id"] == info["id"] and again["encode_ms"] == 0
    assert len(calls) == 1
    got = client.get(f"/v1/images/{info['id']}")
    assert got.status_code == 200 and got.json()["width"] == W


def test_upload_applies_exif_orientation(client, image):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(image).save(buf, format="JPEG", exif=exif)
    info = upload(client, buf.getvalue(), "image/jpeg", "rot.jpg").json()
    assert (info["width"], info["height"]) == (H, W)


@pytest.mark.parametrize(
    ("data", "ctype", "status", "needle"),
    [
        (b"hello", "text/plain", 415, "content type"),
        (b"hello", "application/octet-stream", 415, "content type"),
        (b"hello", "image/png", 415, "supported format"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image/png", 415, "format"),
        (b"", "image/png", 422, "empty"),
    ],
)
def test_upload_refuses_non_images(client, data, ctype, status, needle):
    assert_error(upload(client, data, ctype), status, needle)


def test_upload_refuses_truncated_image(client, png):
    assert_error(upload(client, png[: len(png) // 2]), 422, "truncated or corrupt")


def test_upload_refuses_too_many_pixels(model, png):
    with make_client(model, max_pixels=H * W - 1) as c:
        assert_error(upload(c, png), 413, "pixels", f"{H * W - 1:,}")


def test_upload_body_limit_json_413(model, png):
    with make_client(model, max_upload_bytes=len(png) // 2) as c:
        # Content-Length known: refused before the body is read.
        assert_error(upload(c, png), 413, "larger than")
        # Streamed without Content-Length: refused once the limit is passed.
        r = c.post(
            "/v1/images/" + "0" * 64 + "/predict",
            content=iter([b'{"points": [[1, 1]], "labels": [1], "box": null', b" " * len(png)]),
            headers={"Content-Type": "application/json"},
        )
        assert_error(r, 413, "larger than")
        assert c.get("/v1/health").status_code == 200


def test_upload_needs_a_file_and_never_fetches_urls(client):
    assert_error(client.post("/v1/images"), 422)
    r = client.post("/v1/images", json={"url": "http://127.0.0.1:1/x.png"})
    assert_error(r, 422)
    r = client.post("/v1/images", data={"file": "http://127.0.0.1:1/x.png"})
    assert_error(r, 422)


def test_image_paths_are_validated(client):
    assert_error(client.get("/v1/images/" + "a" * 64), 404, "not in the cache")
    assert_error(client.get("/v1/images/not-a-hash"), 422)
    assert_error(client.post("/v1/images/" + "A" * 64 + "/predict", json={}), 422)


def test_delete_image(client, image_id):
    assert client.delete(f"/v1/images/{image_id}").status_code == 204
    assert_error(client.get(f"/v1/images/{image_id}"), 404)
    assert_error(client.delete(f"/v1/images/{image_id}"), 404)


# ----------------------------------------------------------------------------- predict
def decoded(masks: list[dict]) -> np.ndarray:
    return np.stack([decode_rle(m["segmentation"]) for m in masks])


def test_predict_point_equals_library(client, image_id, model, image):
    r = client.post(
        f"/v1/images/{image_id}/predict",
        json={"points": [[90, 60], [20, 100]], "labels": [1, 0]},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    p = Predictor(model)
    p.set_image(image)
    masks, scores, _ = p.predict(np.array([[90, 60], [20, 100]]), np.array([1, 0]))
    assert len(out["masks"]) == 3
    np.testing.assert_array_equal(decoded(out["masks"]), masks)
    np.testing.assert_allclose([m["score"] for m in out["masks"]], scores, rtol=1e-6)
    assert out["best"] == int(np.argmax(scores))
    for m, ref in zip(out["masks"], masks):
        assert m["segmentation"]["size"] == [H, W]
        assert m["area"] == int(ref.sum())
        assert m["bbox"] == [float(v) for v in mask_utils.toBbox(encode_rle_for_coco(ref))]
    assert out["low_res_logits"] is None and out["decode_ms"] >= 0


def test_predict_refines_segany_lite_masks_as_the_library(png, image, tmp_path):
    # segany-lite models are refined on the photo by default (segany.refine); the server
    # restores the embedding and decodes the upload again for the guide, also after a restart
    # from its disk cache.
    from conftest import TINY_LITE

    lite = randomize_(build_sam(TINY_LITE), seed=2).eval()
    p = Predictor(lite)
    p.set_image(image)
    body = {"points": [[90, 60], [20, 100]], "labels": [1, 0]}
    masks, _, _ = p.predict(np.array(body["points"]), np.array(body["labels"]))
    unrefined = Predictor(lite, refine=False)
    unrefined.set_image(image)
    plain, _, _ = unrefined.predict(np.array(body["points"]), np.array(body["labels"]))
    assert not np.array_equal(masks, plain)
    for _ in range(2):  # the second client starts from the first one's disk cache
        with make_client(lite, cache_dir=str(tmp_path)) as c:
            image_id = upload(c, png).json()["id"]
            r = c.post(f"/v1/images/{image_id}/predict", json=body)
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(decoded(r.json()["masks"]), masks)


def encode_rle_for_coco(mask: np.ndarray) -> dict:
    rle = encode_rle(mask)
    return {"size": rle["size"], "counts": rle["counts"].encode()}


def test_predict_box_and_mask_input_round_trip(client, image_id, model, image):
    r = client.post(
        f"/v1/images/{image_id}/predict",
        json={"box": [10, 10, 120, 90], "multimask_output": False, "return_low_res_logits": True},
    )
    out = r.json()
    assert r.status_code == 200 and len(out["masks"]) == 1 and len(out["low_res_logits"]) == 1
    logits = (
        np.frombuffer(base64.b64decode(out["low_res_logits"][0]), "<f4").reshape(1, 40, 40).copy()
    )
    p = Predictor(model)
    p.set_image(image)
    _, _, ref_low = p.predict(box=np.array([10, 10, 120, 90]), multimask_output=False)
    np.testing.assert_allclose(logits, ref_low, atol=1e-5)
    # Feed the logits back, alone and with a point.
    for body in (
        {"mask_input": out["low_res_logits"][0]},
        {"points": [[50, 50]], "labels": [1], "mask_input": out["low_res_logits"][0]},
    ):
        r2 = client.post(f"/v1/images/{image_id}/predict", json=body)
        assert r2.status_code == 200, r2.text
        pts = np.array(body.get("points", np.zeros((0, 2))))
        ref, _, _ = p.predict(
            pts if len(pts) else None,
            np.array(body.get("labels", [])) if len(pts) else None,
            mask_input=logits,
        )
        np.testing.assert_array_equal(decoded(r2.json()["masks"]), ref)


def test_predict_zoom_in_equals_library(client, image_id, model, image):
    """zoom_in: the server's answers are ZoomInPredictor's on the cached embedding (the crop
    encoded per request; previous logits taken from the request's mask_input)."""
    from segany.zoom import ZoomInPredictor

    lib = ZoomInPredictor(Predictor(model))
    lib.set_image(image)
    r = client.post(
        f"/v1/images/{image_id}/predict",
        json={"box": [40, 20, 100, 80], "multimask_output": False, "zoom_in": True},
    )
    assert r.status_code == 200, r.text
    ref, ref_scores, _ = lib.predict(box=np.array([40, 20, 100, 80]), multimask_output=False)
    np.testing.assert_array_equal(decoded(r.json()["masks"]), ref)
    np.testing.assert_allclose([m["score"] for m in r.json()["masks"]], ref_scores, rtol=1e-5)

    first = {"points": [[90, 60]], "labels": [1], "return_low_res_logits": True, "zoom_in": True}
    r = client.post(f"/v1/images/{image_id}/predict", json=first)
    assert r.status_code == 200, r.text
    out = r.json()
    masks, scores, low = lib.predict(np.array([[90, 60]]), np.array([1]))
    np.testing.assert_array_equal(decoded(out["masks"]), masks)
    best = out["best"]
    logits = np.frombuffer(base64.b64decode(out["low_res_logits"][best]), "<f4").reshape(1, 40, 40)
    np.testing.assert_allclose(logits, low[best : best + 1], atol=1e-5)
    second = {
        "points": [[90, 60], [30, 100]],
        "labels": [1, 0],
        "mask_input": out["low_res_logits"][best],
        "multimask_output": False,
        "zoom_in": True,
    }
    r = client.post(f"/v1/images/{image_id}/predict", json=second)
    assert r.status_code == 200, r.text
    fresh = ZoomInPredictor(Predictor(model))
    fresh.set_image(image)  # no memory of earlier answers, as the server
    ref, _, _ = fresh.predict(
        np.array([[90, 60], [30, 100]]),
        np.array([1, 0]),
        mask_input=logits.copy(),
        multimask_output=False,
    )
    np.testing.assert_array_equal(decoded(r.json()["masks"]), ref)
    bad = {"points": [[500, 10]], "labels": [1], "zoom_in": True}
    assert_error(client.post(f"/v1/images/{image_id}/predict", json=bad), 422, "out of bounds")


def test_predict_zoom_crop_goes_on_from_the_previous_crop(client, image_id, model, image):
    """zoom_crop: the answer carries the crop the refinement holds; sent back with the next
    click, the server goes on from it as a ZoomInPredictor told that crop would, reusing the
    encoding while it holds it, and gives the same answer when it must encode it again."""
    from segany.zoom import ZoomInPredictor

    service = client.app.state.service
    first = {"points": [[90, 60]], "labels": [1], "return_low_res_logits": True, "zoom_in": True}
    out = client.post(f"/v1/images/{image_id}/predict", json=first).json()
    lib = ZoomInPredictor(Predictor(model))
    lib.set_image(image)
    lib.predict(np.array([[90, 60]]), np.array([1]))
    crop = out["zoom_crop"]
    assert lib.crop_rect is not None and crop == list(lib.crop_rect)
    assert service.zoom_crops_kept == 1
    best = out["best"]
    logits = np.frombuffer(base64.b64decode(out["low_res_logits"][best]), "<f4").reshape(1, 40, 40)
    second = {
        "points": [[90, 60], [95, 64]],
        "labels": [1, 1],
        "mask_input": out["low_res_logits"][best],
        "multimask_output": False,
        "zoom_in": True,
        "zoom_crop": crop,
    }
    told = ZoomInPredictor(Predictor(model))
    told.set_image(image)
    told.encode_crop(crop)
    ref, ref_scores, _ = told.predict(
        np.array([[90, 60], [95, 64]]),
        np.array([1, 1]),
        mask_input=logits.copy(),
        multimask_output=False,
    )
    encoded: list[tuple[int, ...]] = []
    real = ZoomInPredictor.encode_crop

    def counting(self, rect):
        encoded.append(tuple(int(v) for v in rect))
        return real(self, rect)

    answers = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ZoomInPredictor, "encode_crop", counting)
        for forget in (False, True):
            if forget:
                service._zoom_crops.clear()
            r = client.post(f"/v1/images/{image_id}/predict", json=second)
            assert r.status_code == 200, r.text
            answers.append(r.json())
            np.testing.assert_array_equal(decoded(r.json()["masks"]), ref)
            np.testing.assert_allclose(
                [m["score"] for m in r.json()["masks"]], ref_scores, rtol=1e-5
            )
            assert r.json()["zoom_crop"] == list(told.crop_rect)
            assert (tuple(crop) in encoded) == forget  # reused while held, else encoded again
    assert answers[0]["masks"] == answers[1]["masks"]
    # Wrong crops: 422 with the reason.
    for bad, needle in (
        ([0, 0, W + 1, 10], "inside"),
        ([5, 5, 5, 9], "inside"),
        ([0, 0, 10], "zoom_crop"),
    ):
        r = client.post(f"/v1/images/{image_id}/predict", json=dict(second, zoom_crop=bad))
        assert_error(r, 422, needle)
    plain = dict(second, zoom_in=False)
    assert_error(client.post(f"/v1/images/{image_id}/predict", json=plain), 422, "zoom_in")
    # Deleting the image forgets its crops too.
    assert service.zoom_crops_kept >= 1
    assert client.delete(f"/v1/images/{image_id}").status_code == 204
    assert service.zoom_crops_kept == 0


def test_zoom_crops_kept_are_bounded(model, png):
    with make_client(model, zoom_crops=1) as c:
        key = upload(c, png).json()["id"]
        crops = []
        empty = base64.b64encode(np.full((40, 40), -20.0, "<f4").tobytes()).decode()
        for x in (30, 150):  # a second click on an empty mask: a crop around the two clicks
            body = {
                "points": [[x, 60], [x + 2, 62]],
                "labels": [1, 1],
                "mask_input": empty,
                "zoom_in": True,
            }
            r = c.post(f"/v1/images/{key}/predict", json=body)
            assert r.status_code == 200, r.text
            crops.append(r.json()["zoom_crop"])
        assert crops[0] != crops[1] and c.app.state.service.zoom_crops_kept == 1
    with make_client(model, zoom_crops=0) as c:
        key = upload(c, png).json()["id"]
        body = {"points": [[30, 60]], "labels": [1], "zoom_in": True}
        r = c.post(f"/v1/images/{key}/predict", json=body)
        assert r.status_code == 200 and len(r.json()["zoom_crop"]) == 4
        assert c.app.state.service.zoom_crops_kept == 0
    with pytest.raises(ValueError, match="zoom_crops"):
        ServerSettings(zoom_crops=-1)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "at least one point"),
        ({"points": [[1, 1]]}, "same length"),
        ({"points": [[1, 1]], "labels": [2]}, "labels"),
        ({"points": [[1, 1, 1]], "labels": [1]}, "points"),
        ({"points": [[500, 10]], "labels": [1]}, "out of bounds"),
        ({"points": [[-1, 10]], "labels": [1]}, "out of bounds"),
        ({"box": [50, 50, 10, 10]}, "x1 >= x0"),
        ({"box": [0, 0, 10]}, "box"),
        ({"box": [0, 0, 1000, 10]}, "out of bounds"),
        ({"mask_input": "not base64!"}, "base64"),
        ({"mask_input": base64.b64encode(b"\0" * 12).decode()}, "float32"),
        ({"mask_input": base64.b64encode(np.full(1600, np.nan, "<f4").tobytes()).decode()}, "NaN"),
        ({"points": [[1, 1]], "labels": [1], "unknown": 1}, "extra"),
        ({"points": [[1, 1]], "labels": [1], "multimask_output": "maybe"}, "bool"),
    ],
)
def test_predict_bad_prompts_are_422(client, image_id, body, needle):
    assert_error(client.post(f"/v1/images/{image_id}/predict", json=body), 422, needle)


def test_predict_non_finite_and_bad_json_are_422(client, image_id):
    url = f"/v1/images/{image_id}/predict"
    headers = {"Content-Type": "application/json"}
    for raw in (
        '{"points": [[NaN, 1]], "labels": [1]}',
        '{"box": [0, 0, Infinity, 1]}',
        '{"points": [[1, 1]], "labels": [1]',
        "[]",
    ):
        assert_error(client.post(url, content=raw, headers=headers), 422)


def test_predict_point_limit(model, png):
    with make_client(model, max_prompt_points=2) as c:
        iid = upload(c, png).json()["id"]
        body = {"points": [[1, 1]] * 3, "labels": [1] * 3}
        assert_error(c.post(f"/v1/images/{iid}/predict", json=body), 422, "at most 2 points")


def test_predict_unknown_image_is_404(client):
    r = client.post("/v1/images/" + "b" * 64 + "/predict", json={"points": [[1, 1]], "labels": [1]})
    assert_error(r, 404, "upload it again")


# ----------------------------------------------------------------------------- everything
EVERYTHING = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def test_everything_equals_generator(client, image_id, model, image):
    r = client.post(f"/v1/images/{image_id}/everything", json=EVERYTHING)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = AutomaticMaskGenerator(model, output_mode="coco_rle", **EVERYTHING).generate(image)
    assert len(out["masks"]) == len(ref) > 0
    got = sorted(m["segmentation"]["counts"] for m in out["masks"])
    assert got == sorted(m["segmentation"]["counts"] for m in ref)
    for m in out["masks"]:
        assert set(m) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "stability_score",
            "point_coords",
            "crop_box",
        }
        assert np.isfinite(m["stability_score"]) and np.isfinite(m["predicted_iou"])


def test_everything_with_crops_and_memory_budget(model, png):
    budget = 3 * 7 * H * W * 5  # five points per batch
    with make_client(model, everything_memory_bytes=budget) as c:
        iid = upload(c, png).json()["id"]
        body = {**EVERYTHING, "crop_n_layers": 1, "points_per_batch": 64}
        r = c.post(f"/v1/images/{iid}/everything", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["points_per_batch"] == 5


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"points_per_side": 9}, 422, "at most 8"),
        ({"points_per_side": 4, "crop_n_layers": 2}, 422, "at most 1"),
        (
            {"points_per_side": 1, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2},
            422,
            ">= 1",
        ),
        ({"points_per_side": 0}, 422, "points_per_side"),
        ({"pred_iou_thresh": 1.5}, 422, "pred_iou_thresh"),
        ({"crop_overlap_ratio": 1.0}, 422, "crop_overlap_ratio"),
        ({"output_mode": "binary_mask"}, 422, "extra"),
    ],
)
def test_everything_bad_parameters(client, image_id, body, status, needle):
    assert_error(client.post(f"/v1/images/{image_id}/everything", json=body), status, needle)


def test_everything_on_a_one_pixel_image_is_not_a_500(client):
    iid = upload(client, png_bytes(np.full((1, 1, 3), 200, np.uint8))).json()["id"]
    body = {**EVERYTHING, "points_per_side": 2, "crop_n_layers": 1}
    r = client.post(f"/v1/images/{iid}/everything", json=body)
    assert r.status_code in (200, 422), r.text


# ----------------------------------------------------------------------------- export
def make_annotations(client, image_id) -> list[dict]:
    anns = []
    for k, (pt, cat) in enumerate((([40, 30], "cat"), ([150, 90], "dog"), ([90, 60], "cat"))):
        out = client.post(
            f"/v1/images/{image_id}/predict", json={"points": [pt], "labels": [1]}
        ).json()
        best = out["masks"][out["best"]]
        anns.append(
            {"segmentation": best["segmentation"], "category": cat, "name": f"o{k}", "score": 0.5}
        )
    return anns


@pytest.mark.parametrize("mode", ["rle", "polygon"])
def test_export_coco_is_valid_coco(client, image_id, mode, tmp_path):
    from pycocotools.coco import COCO

    anns = make_annotations(client, image_id)
    r = client.post(
        f"/v1/images/{image_id}/export/coco",
        json={"annotations": anns, "mode": mode, "file_name": "photo.png"},
    )
    assert r.status_code == 200, r.text
    data = r.json()
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    assert data["images"][0] | {"segany_id": image_id} == {
        "id": 1,
        "file_name": "photo.png",
        "height": H,
        "width": W,
        "segany_id": image_id,
    }
    got = coco.loadAnns(coco.getAnnIds())
    nonempty = [a for a in anns if decode_rle(a["segmentation"]).any()]
    assert len(got) == (len(anns) if mode == "rle" else len(nonempty))
    for ann in got:
        src = anns[int(ann["name"][1:])]
        np.testing.assert_array_equal(
            decode_rle(coco.annToRLE(ann)), decode_rle(src["segmentation"])
        )
        assert ann["category_id"] == (1 if src["category"] == "cat" else 2)


def test_export_without_cached_image_uses_mask_size(client, image_id):
    anns = make_annotations(client, image_id)
    other = "c" * 64
    r = client.post(f"/v1/images/{other}/export/coco", json={"annotations": anns})
    assert r.status_code == 200 and r.json()["images"][0]["height"] == H
    assert_error(client.post(f"/v1/images/{other}/export/coco", json={"annotations": []}), 404)
    mixed = [anns[0], {"segmentation": {"size": [5, 5], "counts": [25]}}]
    assert_error(client.post(f"/v1/images/{other}/export/coco", json={"annotations": mixed}), 422)


@pytest.mark.parametrize(
    ("segmentation", "needle"),
    [
        ({"size": [H, W], "counts": [5]}, "RLE"),
        ({"size": [H, W], "counts": "!!!"}, "RLE"),
        ({"size": [10, 10], "counts": [100]}, "10 x 10"),
        ({"size": [H], "counts": [H * W]}, "size"),
        ({"size": [H, W]}, "counts"),
    ],
)
def test_export_bad_masks_are_422(client, image_id, segmentation, needle):
    body = {"annotations": [{"segmentation": segmentation}]}
    for kind in ("coco", "label-map"):
        r = client.post(f"/v1/images/{image_id}/export/{kind}", json=body)
        assert_error(r, 422, needle)


def test_export_label_map_png(client, image_id):
    anns = make_annotations(client, image_id)
    r = client.post(f"/v1/images/{image_id}/export/label-map", json={"annotations": anns})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = np.asarray(Image.open(io.BytesIO(r.content)))
    assert labels.shape == (H, W) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    for k, a in enumerate(anns, start=1):
        assert not (labels == k).any() or decode_rle(a["segmentation"])[labels == k].all()
    empty = client.post(f"/v1/images/{image_id}/export/label-map", json={"annotations": []})
    assert empty.status_code == 200
    assert not np.asarray(Image.open(io.BytesIO(empty.content))).any()


# ----------------------------------------------------------------------------- models, health
def test_models_and_health(client):
    m = client.get("/v1/models").json()
    assert m["loaded"]["name"] == "custom" and m["loaded"]["mask_input_size"] == [40, 40]
    names = {e["name"] for e in m["models"]}
    assert {"vit_b", "vit_h", "segany-lite"} <= names
    h = client.get("/v1/health").json()
    assert h["status"] == "ok" and h["queue"]["workers"] == 1 and "bytes" in h["cache"]


def test_openapi_documents_the_versioned_api(client):
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/v1/health",
        "/v1/models",
        "/v1/images",
        "/v1/images/{image_id}",
        "/v1/images/{image_id}/predict",
        "/v1/images/{image_id}/everything",
        "/v1/images/{image_id}/export/coco",
        "/v1/images/{image_id}/export/label-map",
    } == paths


def test_default_model_is_the_bundled_one(monkeypatch, model):
    import segany.build

    calls = []
    monkeypatch.setattr(segany.build, "build_model", lambda *a, **k: calls.append((a, k)) or model)
    create_app()
    assert calls == [((), {})]


# ----------------------------------------------------------------------------- security
def test_api_key(model, png):
    with make_client(model, api_key="s3cret-ключ") as c:
        assert_error(upload(c, png), 401, "X-API-Key")
        assert_error(c.get("/v1/models", headers={"X-API-Key": "wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"X-API-Key": "s3cret"}), 401)
        ok = [(b"X-API-Key", "s3cret-ключ".encode())]  # raw UTF-8 bytes on the wire
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/v1/health").status_code == 200  # liveness stays open
        assert c.get("/").status_code == 200  # the page asks for the key itself
        schema = c.get("/openapi.json").json()
        assert "APIKeyHeader" in schema["components"]["securitySchemes"]


def test_cors_off_by_default_and_configurable(model):
    origin = {"Origin": "http://example.org"}
    with make_client(model) as c:
        assert "access-control-allow-origin" not in c.get("/v1/health", headers=origin).headers
    with make_client(model, cors_origins=("http://example.org",)) as c:
        r = c.get("/v1/health", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.org"
        r = c.get("/v1/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in r.text
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        s = client.get(f"/static/{name}")
        assert s.status_code == 200 and ctype in s.headers["content-type"]
    assert client.get("/static/../server/app.py").status_code == 404


# ----------------------------------------------------------------------------- errors
def test_unexpected_errors_are_500_without_traceback(model, png, caplog):
    app = create_app(model, ServerSettings())

    def broken(*_):
        raise KeyError("internal detail")

    app.state.service.predict = broken
    with TestClient(app, raise_server_exceptions=False) as c:
        iid = upload(c, png).json()["id"]
        r = c.post(f"/v1/images/{iid}/predict", json={"points": [[1, 1]], "labels": [1]})
        assert_error(r, 500, "internal error", "reference")
        assert "internal detail" not in r.text
    assert "internal detail" in caplog.text


@pytest.mark.parametrize("error", [MemoryError, torch.OutOfMemoryError])
def test_out_of_memory_is_503(model, png, error):
    app = create_app(model, ServerSettings())

    def hungry(*_):
        raise error("out of memory")

    app.state.service.predict = hungry
    with TestClient(app) as c:
        iid = upload(c, png).json()["id"]
        r = c.post(f"/v1/images/{iid}/predict", json={"points": [[1, 1]], "labels": [1]})
        assert_error(r, 503, "memory")


# ----------------------------------------------------------------------------- queue
def test_full_queue_and_long_waits_are_503(model, png):
    app = create_app(model, ServerSettings(workers=1, max_queue=1, timeout_s=0.5))
    gate = threading.Event()
    real = app.state.service.predict

    def slow(*args):
        gate.wait(10)
        return real(*args)

    body = {"points": [[1, 1]], "labels": [1]}
    with TestClient(app) as c:
        iid = upload(c, png).json()["id"]
        app.state.service.predict = slow
        results: list[int] = []
        first = threading.Thread(
            target=lambda: results.append(
                c.post(f"/v1/images/{iid}/predict", json=body).status_code
            )
        )
        first.start()
        while app.state.runner.pending < 1:
            time.sleep(0.01)
        # The second waits in the queue and gives up after timeout_s; the third finds it full.
        second = threading.Thread(
            target=lambda: results.append(
                c.post(f"/v1/images/{iid}/predict", json=body).status_code
            )
        )
        second.start()
        while app.state.runner.pending < 2:
            time.sleep(0.01)
        started = time.monotonic()
        r = c.post(f"/v1/images/{iid}/predict", json=body)
        assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        second.join(5)
        assert time.monotonic() - started < 3
        gate.set()
        first.join(10)
        assert sorted(results) == [200, 503]
        stats = c.get("/v1/health").json()["queue"]
        assert stats["rejected"] == 1 and stats["timed_out"] == 1
        app.state.service.predict = real
        assert c.post(f"/v1/images/{iid}/predict", json=body).status_code == 200


def test_concurrent_requests_are_safe(model, png, image):
    app = create_app(model, ServerSettings(workers=2))
    prompts = [[[20 + 15 * k, 15 + 9 * k]] for k in range(8)]

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            files = {"file": ("a.png", png, "image/png")}
            iid = (await ac.post("/v1/images", files=files)).json()["id"]
            calls = [
                ac.post(f"/v1/images/{iid}/predict", json={"points": p, "labels": [1]})
                for p in prompts * 3
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(main())
    p = Predictor(model)
    p.set_image(image)
    for r, pts in zip(responses, prompts * 3):
        assert r.status_code == 200, r.text
        ref, _, _ = p.predict(np.array(pts), np.array([1]))
        np.testing.assert_array_equal(decoded(r.json()["masks"]), ref)


def test_runner_unit():
    async def main() -> None:
        runner = ModelRunner(workers=1, max_queue=0, timeout_s=5)
        gate = threading.Event()
        first = asyncio.ensure_future(runner.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        with pytest.raises(ServerBusy, match="busy"):
            await runner.run(lambda: 1)
        gate.set()
        assert await first is True
        assert await runner.run(lambda: torch.is_grad_enabled()) is False
        with pytest.raises(ZeroDivisionError):
            await runner.run(lambda: 1 / 0)
        assert runner.pending == 0
        runner.shutdown()
        runner.shutdown()
        assert await runner.run(lambda: 2) == 2  # started again
        runner.shutdown()

    asyncio.run(main())


# ----------------------------------------------------------------------------- cache
def test_cache_is_bounded_by_memory(model):
    pngs = [png_bytes(synthetic_image(H, W, seed=10 + k)) for k in range(4)]
    app = create_app(model, ServerSettings())
    with TestClient(app) as c:
        ids = [upload(c, d).json()["id"] for d in pngs[:1]]
        entry_bytes = app.state.service.cache.nbytes
    bound = int(entry_bytes * 2.5)
    app = create_app(model, ServerSettings(cache_bytes=bound))
    with TestClient(app) as c:
        ids = [upload(c, d).json()["id"] for d in pngs]
        cache = app.state.service.cache
        assert len(cache) == 2 and cache.nbytes <= bound
        assert cache.stats()["evictions"] == 2
        assert_error(c.post(f"/v1/images/{ids[0]}/predict", json={"box": [0, 0, 9, 9]}), 404)
        assert c.post(f"/v1/images/{ids[3]}/predict", json={"box": [0, 0, 9, 9]}).status_code == 200
        # Using an entry makes it the most recent: uploading again evicts the other one.
        c.get(f"/v1/images/{ids[2]}")
        upload(c, pngs[0])
        assert ids[2] in cache and ids[3] not in cache


def test_entry_larger_than_cache_is_not_kept(model, png):
    with make_client(model, cache_bytes=1000) as c:
        r = upload(c, png)
        assert r.status_code == 200
        assert_error(c.get(f"/v1/images/{r.json()['id']}"), 404)


def test_disk_cache_survives_a_restart(model, png, tmp_path, monkeypatch):
    settings = {"cache_dir": str(tmp_path / "cache")}
    with make_client(model, **settings) as c:
        iid = upload(c, png).json()["id"]
        first = c.post(f"/v1/images/{iid}/predict", json={"box": [5, 5, 100, 80]}).json()
    calls = []
    real = model.image_encoder.forward
    monkeypatch.setattr(model.image_encoder, "forward", lambda x: calls.append(1) or real(x))
    with make_client(model, **settings) as c:  # a new server, same folder
        assert c.get(f"/v1/images/{iid}").status_code == 200
        again = c.post(f"/v1/images/{iid}/predict", json={"box": [5, 5, 100, 80]}).json()
        assert again["masks"] == first["masks"]
        assert upload(c, png).json()["cached"] is True
        assert c.post(f"/v1/images/{iid}/everything", json=EVERYTHING).status_code == 200
        assert c.get("/v1/health").json()["cache"]["disk_hits"] == 1
    assert calls == []  # nothing was encoded again
    # Another model's server does not use these files.
    other = randomize_(build_sam(TINY), seed=6).eval()
    with make_client(other, **settings) as c:
        assert_error(c.get(f"/v1/images/{iid}"), 404)
        assert upload(c, png).json()["cached"] is False
    # Deleting removes the files; damaged files are ignored.
    with make_client(model, **settings) as c:
        assert c.delete(f"/v1/images/{iid}").status_code == 204
        upload(c, png)
    folder = tmp_path / "cache" / Predictor(model).model_fingerprint()
    (folder / f"{iid}.safetensors").write_bytes(b"garbage")
    with make_client(model, **settings) as c:
        assert_error(c.get(f"/v1/images/{iid}"), 404)
        assert upload(c, png).json()["cached"] is False


def test_disk_cache_is_bounded(model, tmp_path):
    pngs = [png_bytes(synthetic_image(H, W, seed=30 + k)) for k in range(4)]
    with make_client(model, cache_dir=str(tmp_path)) as c:
        upload(c, pngs[0])
    one = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    cache_dir = tmp_path / "bounded"
    with make_client(model, cache_dir=str(cache_dir), disk_cache_bytes=int(one * 2.5)) as c:
        ids = [upload(c, d).json()["id"] for d in pngs]
    names = {f.name.split(".")[0] for f in cache_dir.rglob("*") if f.is_file()}
    assert names == set(ids[2:])


def test_cache_unit_lru():
    cache = EmbeddingCache(max_bytes=10)
    with pytest.raises(ValueError):
        EmbeddingCache(max_bytes=0)
    assert cache.get("x") is None and cache.stats()["misses"] == 1


# ----------------------------------------------------------------------------- settings, CLI
@pytest.mark.parametrize(
    "bad",
    [
        {"workers": 0},
        {"max_queue": -1},
        {"timeout_s": 0},
        {"cache_bytes": 1.5},
        {"api_key": " "},
        {"cors_origins": "http://a"},
        {"max_crop_layers": 9},
    ],
)
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        ServerSettings(**bad)


def test_cli_serve(monkeypatch, tmp_path, model, capsys):
    import uvicorn

    from segany.checkpoint import save_safetensors
    from segany.cli import main

    ckpt = tmp_path / "tiny.safetensors"
    save_safetensors(model, ckpt, config=model.config)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("SEGANY_API_KEY", "from-env")
    assert main(["serve", "--checkpoint", str(ckpt), "--port", "9123"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9123)
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"X-API-Key": "from-env"}).status_code == 200
    assert main(["serve", "--checkpoint", str(ckpt), "--api-key", "flag", "--cache-mb", "5"]) == 0
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models", headers={"X-API-Key": "flag"}).status_code == 200
        assert c.get("/v1/health").json()["cache"]["max_bytes"] == 5 * 2**20
    capsys.readouterr()
    for args, needle in (
        (["--port", "70000"], "--port"),
        (["--workers", "0"], "workers"),
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth"),
    ):
        assert main(["serve", *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("segany: error: ") and needle in err[0]
