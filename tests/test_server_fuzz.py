"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis).

Every operation gets schema-valid and schema-invalid requests; none may answer 5xx, every
status must be documented and every body must match the documented schema. Three cases in
four use the id of an uploaded image, so predictions, "segment everything" and exports run
for real; the rest use the random ids schemathesis draws (404). A second property test
draws valid prompts (points inside the image, ordered boxes) and expects exactly the
library's masks for every one of them.
"""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
from conftest import TINY, randomize_, synthetic_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from segany.modeling import build_sam  # noqa: E402
from segany.server import ServerSettings, create_app  # noqa: E402

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

APP = create_app(
    randomize_(build_sam(TINY), seed=5).eval(),
    # Small limits keep "segment everything" cheap; refusals above them are 422s to check.
    ServerSettings(max_points_per_side=8, max_crop_layers=1, max_upload_bytes=2**20),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
]
_counter = itertools.count()


H, W = 60, 90
IMAGE = synthetic_image(H, W, seed=2)


def upload() -> str:
    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, format="PNG")
    with TestClient(APP) as client:
        r = client.post("/v1/images", files={"file": ("a.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def image_id() -> str:
    return upload()


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case, image_id):
    params = case.path_parameters or {}
    if "image_id" in params and next(_counter) % 4:
        params["image_id"] = image_id
    response = case.call_and_validate(checks=CHECKS)
    if case.method == "DELETE" and response.status_code == 204:
        upload()  # the other operations need the image


coord_x = st.floats(0, W, allow_nan=False)
coord_y = st.floats(0, H, allow_nan=False)


@st.composite
def prompts(draw) -> dict:
    n = draw(st.integers(0, 4))
    body: dict = {
        "points": [[draw(coord_x), draw(coord_y)] for _ in range(n)],
        "labels": [draw(st.sampled_from([0, 1])) for _ in range(n)],
        "multimask_output": draw(st.booleans()),
    }
    if n == 0 or draw(st.booleans()):
        x0, x1 = sorted([draw(coord_x), draw(coord_x)])
        y0, y1 = sorted([draw(coord_y), draw(coord_y)])
        body["box"] = [x0, y0, x1, y1]
    return body


@given(body=prompts())
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_valid_prompts_always_give_the_library_masks(body, image_id):
    from segany import Predictor
    from segany.masks import decode_rle

    with TestClient(APP) as client:
        r = client.post(f"/v1/images/{image_id}/predict", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    predictor = Predictor(APP.state.service.model)
    predictor.set_image(IMAGE)
    masks, scores, _ = predictor.predict(
        np.array(body["points"]) if body["points"] else None,
        np.array(body["labels"]) if body["points"] else None,
        np.array(body["box"]) if "box" in body else None,
        multimask_output=body["multimask_output"],
    )
    assert len(out["masks"]) == (3 if body["multimask_output"] else 1)
    for m, ref in zip(out["masks"], masks):
        np.testing.assert_array_equal(decode_rle(m["segmentation"]), ref)
