"""Request and response bodies of the HTTP API (pydantic models -> the OpenAPI schema).

Coordinates are pixels of the uploaded image as displayed (EXIF orientation applied), x to
the right and y down; boxes are ``[x0, y0, x1, y1]``; mask bounding boxes are COCO
``[x, y, width, height]``; masks are COCO compressed RLE (``counts`` a string, column-major).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ImageId = Annotated[
    str,
    Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the uploaded file, as returned by POST /v1/images",
    ),
]
Point = Annotated[list[float], Field(min_length=2, max_length=2, description="[x, y] pixels")]
Box = Annotated[list[float], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1]")]
Label = Literal[0, 1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ErrorOut(BaseModel):
    """Every error: a message, or FastAPI's list of validation errors."""

    detail: str | list[dict[str, Any]]


class RLE(BaseModel):
    """COCO compressed RLE of an ``H x W`` mask."""

    size: list[int] = Field(description="[height, width]")
    counts: str


class RLEIn(_Strict):
    """A mask sent back by a client: compressed (string) or uncompressed (list) COCO RLE."""

    size: Annotated[
        list[Annotated[int, Field(ge=1, le=1_000_000)]],
        Field(min_length=2, max_length=2, description="[height, width]"),
    ]
    counts: str | list[Annotated[int, Field(ge=0)]]


class ImageInfo(BaseModel):
    id: str = Field(description="content hash: SHA-256 (hex) of the uploaded file")
    width: int
    height: int
    file_name: str = ""
    cached: bool = Field(description="true when the embedding existed before this request")
    encode_ms: float = Field(description="time spent encoding (0 when cached)")


class PredictRequest(_Strict):
    """Prompts for one object: points and/or a box and/or the low-res logits of a previous
    answer. Without any prompt the request is refused."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"points": [[10, 10]], "labels": [1]},
                {"points": [[10, 10], [30, 20]], "labels": [1, 0], "multimask_output": False},
                {"box": [5, 5, 40, 30], "return_low_res_logits": True},
            ]
        }
    )

    points: list[Point] = Field(default_factory=list, max_length=1000)
    labels: list[Label] = Field(
        default_factory=list, max_length=1000, description="1 positive, 0 negative; one per point"
    )
    box: Box | None = None
    mask_input: str | None = Field(
        default=None,
        max_length=2_000_000,
        description="base64 of little-endian float32 low-res logits (mask_input_size of "
        "GET /v1/models, usually 256 x 256), e.g. a low_res_logits entry of an earlier answer",
    )
    multimask_output: bool = Field(
        default=True,
        description="3 candidates (good for one ambiguous click) instead of 1",
    )
    return_low_res_logits: bool = False
    zoom_in: bool = Field(
        default=False,
        description="refine on a crop around the object, encoded at the model's input size "
        "(segany.zoom.ZoomInPredictor): clicks after the first (given with the mask_input of "
        "the previous answer) and the first click's second pass; sharper boundaries, "
        "at the cost of encoding the crop (milliseconds with segany-lite, seconds for ViT "
        "models on a CPU)",
    )
    zoom_crop: list[int] | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description="with zoom_in: the zoom_crop [x0, y0, x1, y1] of the previous answer for "
        "this object (sent with its low_res_logits as mask_input). The refinement goes on from "
        "that crop as one ZoomInPredictor would across clicks, and the server reuses its "
        "encoding when it still holds it (the answer is the same either way)",
    )

    @model_validator(mode="after")
    def _check(self) -> PredictRequest:
        if len(self.points) != len(self.labels):
            raise ValueError(
                f"points and labels must have the same length, got {len(self.points)} points "
                f"and {len(self.labels)} labels"
            )
        if not self.points and self.box is None and self.mask_input is None:
            raise ValueError("give at least one point, a box or a mask_input")
        if self.zoom_crop is not None and not self.zoom_in:
            raise ValueError("zoom_crop is for zoom_in requests")
        return self


class MaskOut(BaseModel):
    segmentation: RLE
    score: float = Field(description="predicted IoU")
    area: int
    bbox: list[float] = Field(description="[x, y, width, height]")


class PredictResponse(BaseModel):
    masks: list[MaskOut]
    best: int = Field(description="index of the candidate with the highest predicted IoU")
    low_res_logits: list[str] | None = Field(
        default=None, description="per candidate: base64 little-endian float32 logits"
    )
    zoom_crop: list[int] | None = Field(
        default=None,
        description="zoom_in: the crop [x0, y0, x1, y1] (exclusive ends) the refinement holds "
        "after this answer; send it back as zoom_crop with the next click",
    )
    decode_ms: float


class EverythingRequest(_Strict):
    """Parameters of the automatic mask generator (see segany.AutomaticMaskGenerator)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
                {"points_per_side": 4, "crop_n_layers": 1, "min_mask_region_area": 20},
            ]
        }
    )

    points_per_side: int = Field(default=32, ge=1, le=256)
    points_per_batch: int = Field(
        default=64, ge=1, le=1024, description="upper bound; lowered to fit the memory budget"
    )
    pred_iou_thresh: float | None = Field(
        default=None, ge=0.0, le=1.0, description="default: the model's own (SAM: 0.88)"
    )
    stability_score_thresh: float | None = Field(
        default=None, ge=0.0, le=1.0, description="default: the model's own (SAM: 0.95)"
    )
    stability_score_offset: float | None = Field(
        default=None, ge=0.0, le=100.0, description="default: the model's own (SAM: 1.0)"
    )
    box_nms_thresh: float = Field(default=0.7, ge=0.0, le=1.0)
    crop_n_layers: int = Field(default=0, ge=0, le=4)
    crop_nms_thresh: float = Field(default=0.7, ge=0.0, le=1.0)
    crop_overlap_ratio: float = Field(default=512 / 1500, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int = Field(default=1, ge=1, le=16)
    min_mask_region_area: int = Field(default=0, ge=0, le=100_000_000)


class EverythingMask(BaseModel):
    segmentation: RLE
    area: int
    bbox: list[float] = Field(description="[x, y, width, height]")
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[float] = Field(description="[x, y, width, height]")


class EverythingResponse(BaseModel):
    masks: list[EverythingMask]
    points_per_batch: int = Field(description="the batch size used")
    elapsed_ms: float


class AnnotationIn(_Strict):
    segmentation: RLEIn
    category: str = Field(default="object", min_length=1, max_length=200)
    name: str | None = Field(default=None, max_length=200, description="instance name")
    score: float | None = None


class LabelMapRequest(_Strict):
    annotations: list[AnnotationIn] = Field(max_length=65535)


class CocoRequest(_Strict):
    annotations: list[AnnotationIn] = Field(max_length=65535)
    mode: Literal["rle", "polygon"] = "rle"
    polygon_tolerance: float = Field(default=0.0, ge=0.0, le=1000.0)
    file_name: str | None = Field(default=None, max_length=1000)


class LoadedModel(BaseModel):
    name: str
    img_size: int
    mask_input_size: list[int]
    fingerprint: str


class ModelEntry(BaseModel):
    name: str
    description: str
    loaded: bool
    checkpoint_file: str | None = None


class ModelsResponse(BaseModel):
    loaded: LoadedModel
    models: list[ModelEntry]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    version: str
    queue: dict[str, int]
    cache: dict[str, int | bool]
