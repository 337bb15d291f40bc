"""``create_app``: the FastAPI application (versioned JSON API under /v1, the page at /).

Model work runs in a :class:`ModelRunner` thread pool, never on the event loop. Errors are
JSON ``{"detail": ...}``: 4xx for anything the client can fix, 503 when the server is busy
or out of memory, 500 only for bugs (logged with a reference, no traceback in the answer).
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, FastAPI, File, HTTPException, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..images import ImageLoadError
from ..modeling.sam import Sam
from .cache import CachedImage
from .runner import ModelRunner, ServerBusy
from .schemas import (
    CocoRequest,
    ErrorOut,
    EverythingRequest,
    EverythingResponse,
    HealthResponse,
    ImageInfo,
    LabelMapRequest,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
)
from .service import ImageTooLarge, SegmentService, UnsupportedImage, image_id
from .settings import ServerSettings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_HEADER = "X-API-Key"

ImageIdPath = Annotated[
    str,
    PathParam(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the uploaded file, as returned by POST /v1/images",
    ),
]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


class BodyLimitMiddleware:
    """413 (JSON) for request bodies over ``max_bytes``: at once when Content-Length says so,
    else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than the server's limit of {self.max_bytes:,} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    await JSONResponse({"detail": "invalid Content-Length"}, 400)(
                        scope, receive, send
                    )
                    return
                if length > self.max_bytes:
                    await JSONResponse({"detail": message}, 413)(scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body parsing as they are.
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="API key")


async def require_api_key(
    request: Request, key: Annotated[str | None, Security(_key_header)]
) -> None:
    """401 unless the X-API-Key header equals the configured key (constant-time compare)."""
    expected: str | None = request.app.state.service.settings.api_key
    if expected is None:
        return
    # Header values arrive decoded as latin-1: encoding back gives the bytes on the wire.
    given = (key or "").encode("latin-1", "replace")
    if not hmac.compare_digest(given, expected.encode("utf-8")):
        raise HTTPException(
            401,
            f"missing or wrong API key (send it in the {API_KEY_HEADER} header)",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )


def create_app(
    model: Sam | None = None,
    settings: ServerSettings | None = None,
    *,
    model_name: str | None = None,
) -> FastAPI:
    """The server for ``model`` (default: the bundled segany-lite, ``segany.build_model()``).

    Tests inject a tiny random model; ``settings`` sets the limits (see :class:`ServerSettings`).
    """
    from .. import __version__

    settings = settings or ServerSettings()
    if model is None:
        from ..build import build_model

        model = build_model()  # the bundled model; CheckpointError until its weights ship
    service = SegmentService(model, settings, model_name)
    runner = ModelRunner(settings.workers, settings.max_queue, settings.timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        runner.shutdown()

    app = FastAPI(
        title="segany",
        version=__version__,
        summary="Segment Anything: promptable segmentation and 'segment everything' over HTTP.",
        description=(
            "Upload an image once (it is encoded and cached by its SHA-256), then ask for masks "
            "from points, boxes or a previous mask in milliseconds. Masks are COCO compressed "
            "RLE; coordinates are pixels of the upright image. The server never fetches URLs."
        ),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    app.state.runner = runner

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ServerBusy)
    async def _busy(_: Request, exc: ServerBusy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back, which may be huge or not even
        # representable in JSON (NaN); the location and message say enough.
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, 422)

    async def _memory(_: Request, exc: Exception) -> JSONResponse:
        logger.warning("out of memory: %s", exc)
        return JSONResponse({"detail": "not enough memory for this request; retry later"}, 503)

    app.add_exception_handler(MemoryError, _memory)
    gpu_oom = getattr(torch, "OutOfMemoryError", None)  # CUDA/MPS allocation failures
    if gpu_oom is not None:
        app.add_exception_handler(gpu_oom, _memory)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        logger.error(
            "unexpected error %s on %s %s", ref, request.method, request.url.path, exc_info=exc
        )
        return JSONResponse({"detail": f"internal error (reference {ref} in the server log)"}, 500)

    # ------------------------------------------------------------------ security
    secured = [Security(require_api_key)] if settings.api_key is not None else []
    # Any request may be refused for its body (400 unreadable, 413 too large) or load (503).
    v1 = APIRouter(prefix="/v1", dependencies=secured, responses=_errors(400, 401, 413, 503))

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await runner.run(fn, *args)
        except (ImageLoadError, ValueError) as exc:
            raise HTTPException(422, _one_line(exc)) from exc

    async def cached_entry(key: str) -> CachedImage:
        entry = service.cache.get(key)
        if entry is None and service.cache.on_disk(key):
            entry = await run(service.load_cached, key)
        if entry is None:
            raise HTTPException(
                404, f"image {key} is not in the cache (evicted or never uploaded); upload it again"
            )
        return entry

    # ------------------------------------------------------------------ routes
    @app.get(
        "/v1/health",
        response_model=HealthResponse,
        tags=["server"],
        responses=_errors(400, 413),
    )
    async def health() -> dict[str, Any]:
        """Liveness, queue and cache figures (no API key needed)."""
        return {
            "status": "ok",
            "model": service.name,
            "version": __version__,
            "queue": runner.stats(),
            "cache": service.cache.stats(),
        }

    @v1.get("/models", response_model=ModelsResponse, tags=["server"])
    async def models() -> dict[str, Any]:
        """The loaded model and the registered variants."""
        from ..registry import list_models

        return {
            "loaded": {
                "name": service.name,
                "img_size": int(model.image_encoder.img_size),
                "mask_input_size": list(service.mask_input_size),
                "fingerprint": service.fingerprint,
            },
            "models": [
                {
                    "name": spec.name,
                    "description": spec.description,
                    "loaded": spec.name == service.name,
                    "checkpoint_file": spec.checkpoint_file,
                }
                for spec in list_models()
            ],
        }

    @v1.post(
        "/images",
        response_model=ImageInfo,
        tags=["images"],
        responses=_errors(413, 415, 422),
    )
    async def upload_image(
        file: Annotated[
            UploadFile, File(description="the image file (PNG, JPEG, WebP, BMP, TIFF, GIF)")
        ],
    ) -> dict[str, Any]:
        """Uploads and encodes an image once; its id is the SHA-256 of the file."""
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype not in settings.allowed_content_types:
            raise HTTPException(
                415,
                f"content type {ctype or '(none)'!r} is not accepted; send the file with an "
                "image type: " + ", ".join(sorted(set(settings.allowed_content_types))),
            )
        data = await file.read()
        if not data:
            raise HTTPException(422, "the uploaded file is empty")
        key = await run_in_threadpool(image_id, data)  # hashing 30 MB takes a while
        name = (file.filename or "")[:1000]
        entry = service.cache.get(key)
        elapsed = 0.0
        cached = entry is not None
        if entry is None:
            try:
                await run_in_threadpool(service.check_header, data)
            except UnsupportedImage as exc:
                raise HTTPException(415, str(exc)) from exc
            except ImageTooLarge as exc:
                raise HTTPException(413, str(exc)) from exc
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from exc
            entry, cached, elapsed = await run(service.encode, key, data, name)
        return {
            "id": key,
            "width": entry.width,
            "height": entry.height,
            "file_name": entry.file_name or name,
            "cached": cached,
            "encode_ms": elapsed,
        }

    @v1.get("/images/{image_id}", response_model=ImageInfo, tags=["images"], responses=_errors(404))
    async def image_info(image_id: ImageIdPath) -> dict[str, Any]:
        """Whether an image is cached (clients can hash a file and skip its upload)."""
        entry = await cached_entry(image_id)
        return {
            "id": entry.id,
            "width": entry.width,
            "height": entry.height,
            "file_name": entry.file_name,
            "cached": True,
            "encode_ms": 0.0,
        }

    @v1.delete("/images/{image_id}", status_code=204, tags=["images"], responses=_errors(404))
    async def delete_image(image_id: ImageIdPath) -> Response:
        """Forgets an image (memory and disk cache)."""
        service.forget_zoom_crops(image_id)
        if not service.cache.discard(image_id):
            raise HTTPException(404, f"image {image_id} is not in the cache")
        return Response(status_code=204)

    @v1.post(
        "/images/{image_id}/predict",
        response_model=PredictResponse,
        tags=["segmentation"],
        responses=_errors(404, 422),
    )
    async def predict(image_id: ImageIdPath, body: PredictRequest) -> dict[str, Any]:
        """Masks for one object from points (1 positive, 0 negative), a box and/or the
        low-res logits of an earlier answer (``mask_input``)."""
        entry = await cached_entry(image_id)
        result: dict[str, Any] = await run(
            service.predict,
            entry,
            body.points,
            body.labels,
            body.box,
            body.mask_input,
            body.multimask_output,
            body.return_low_res_logits,
            body.zoom_in,
            body.zoom_crop,
        )
        return result

    @v1.post(
        "/images/{image_id}/everything",
        response_model=EverythingResponse,
        tags=["segmentation"],
        responses=_errors(404, 422),
    )
    async def everything(image_id: ImageIdPath, body: EverythingRequest) -> dict[str, Any]:
        """ "Segment everything": the automatic mask generator with these parameters."""
        entry = await cached_entry(image_id)
        result: dict[str, Any] = await run(service.everything, entry, body.model_dump())
        return result

    def _annotations(body: CocoRequest | LabelMapRequest) -> list[dict[str, Any]]:
        return [a.model_dump() for a in body.annotations]

    @v1.post(
        "/images/{image_id}/export/coco",
        tags=["export"],
        responses={
            200: {"description": "a COCO instance-segmentation dataset (one image)"},
            **_errors(404, 422),
        },
    )
    async def export_coco(image_id: ImageIdPath, body: CocoRequest) -> JSONResponse:
        """COCO JSON of the annotations (masks as returned by predict), RLE or polygons with
        holes; one category per distinct ``category``."""
        try:
            data = await run_in_threadpool(
                service.coco,
                image_id,
                _annotations(body),
                body.mode,
                body.polygon_tolerance,
                body.file_name,
            )
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, _one_line(exc)) from exc
        return JSONResponse(data)

    @v1.post(
        "/images/{image_id}/export/label-map",
        tags=["export"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "label map PNG"},
            **_errors(404, 422),
        },
    )
    async def export_label_map(image_id: ImageIdPath, body: LabelMapRequest) -> Response:
        """Label-map PNG: 0 background, k = the k-th annotation (smaller objects on top)."""
        try:
            png = await run_in_threadpool(service.label_map_png, image_id, _annotations(body))
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, _one_line(exc)) from exc
        return Response(png, media_type="image/png")

    app.include_router(v1)

    # ------------------------------------------------------------------ page
    page_headers = {
        "Content-Security-Policy": (
            "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
            "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", API_KEY_HEADER],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    return app


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["BodyLimitMiddleware", "create_app"]
