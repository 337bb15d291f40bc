"""Server settings: limits, cache and queue sizes, security switches (one frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Pillow formats the server decodes. Anything else (EPS, PDF, ...) is refused before decoding,
#: whatever content type the client declared: some Pillow plugins run external programs.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
#: Content types accepted for uploads (the declared type of the multipart file part).
ALLOWED_CONTENT_TYPES: tuple[str, ...] = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/webp",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "image/gif",
)

MiB = 2**20


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``create_app`` can be told besides the model. Defaults suit one local user."""

    max_upload_bytes: int = 32 * MiB  #: largest request body (413 above); uploads and JSON
    max_pixels: int = 25_000_000  #: largest image, width x height (413 above), from the header
    cache_bytes: int = 1024 * MiB  #: memory bound of the embedding cache (LRU, incl. image files)
    cache_dir: str | None = None  #: on-disk embedding cache (survives restarts); None = off
    disk_cache_bytes: int = 4096 * MiB  #: bound of the on-disk cache (oldest files removed)
    api_key: str | None = None  #: required in the X-API-Key header of /v1 requests when set
    cors_origins: tuple[str, ...] = ()  #: origins allowed by CORS; empty = CORS off
    workers: int = 1  #: threads running model work (each uses torch's intra-op threads)
    max_queue: int = 64  #: requests waiting for a worker beyond this get 503 at once
    timeout_s: float = 30.0  #: a request waiting longer than this for a worker gets 503
    max_prompt_points: int = 100  #: points per predict request
    max_points_per_side: int = 64  #: "segment everything" grid limit
    max_crop_layers: int = 2  #: "segment everything" crop layers limit
    everything_memory_bytes: int = 512 * MiB  #: "segment everything" batch memory budget
    zoom_crops: int = 8  #: zoom-in crop encodings kept for reuse (LRU; 0 = none; a few MB each)
    allowed_content_types: tuple[str, ...] = field(default=ALLOWED_CONTENT_TYPES)

    def __post_init__(self) -> None:
        positive = (
            "max_upload_bytes",
            "max_pixels",
            "cache_bytes",
            "disk_cache_bytes",
            "workers",
            "max_prompt_points",
            "max_points_per_side",
            "everything_memory_bytes",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_queue", "zoom_crops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if not 0 <= self.max_crop_layers <= 4:
            raise ValueError(f"max_crop_layers must be within 0..4, got {self.max_crop_layers}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (use None for no key)")
        if isinstance(self.cors_origins, str):
            raise ValueError("cors_origins must be a tuple of origins, not one string")
