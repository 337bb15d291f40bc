"""HTTP server and browser annotation page (``segany serve``; needs the ``server`` extra).

``create_app(model=None, settings=None)`` builds the FastAPI application; without a model it
loads the bundled segany-lite (``segany.build_model()``).
"""

from __future__ import annotations

from typing import Any

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI is an optional dependency: imported on use, with a message saying what to install.
    if name == "create_app":
        try:
            from .app import create_app
        except ModuleNotFoundError as exc:
            if exc.name in ("fastapi", "starlette", "multipart", "python_multipart"):
                raise ModuleNotFoundError(
                    f"the segany server needs {exc.name}: pip install 'segany[server]'",
                    name=exc.name,
                ) from exc
            raise
        return create_app
    raise AttributeError(f"module 'segany.server' has no attribute {name!r}")
