"""Embedding cache of the server: an LRU bounded by memory, optionally backed by a folder.

Entries are keyed by the image id (SHA-256 of the uploaded file). An entry holds the image
embedding (``1 x C x h x w``, plus the high-resolution features of decoders that use them),
the image sizes and the uploaded file itself (needed again for "segment everything"); its size
is the bytes of all of these. When the total passes ``max_bytes`` the least recently used
entries are dropped. An entry larger than ``max_bytes`` is not kept in memory at all.

With a folder, every entry is also written there (``<id>.safetensors`` in the format of
:meth:`segany.Predictor.save_embedding`, which refuses files made with other weights, and
``<id>.image``), in a subfolder per model fingerprint, so a restarted server does not encode
its images again. The folder is kept under ``disk_max_bytes`` by removing the least recently
used files (by modification time, refreshed on every read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..masks import atomic_write
from ..predictor import Predictor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedImage:
    """One encoded image."""

    id: str  #: SHA-256 (hex) of the uploaded file
    data: bytes  #: the uploaded file, as received
    width: int
    height: int
    features: torch.Tensor  #: ``1 x C x h x w`` image embedding
    high_res: tuple[torch.Tensor, ...] | None  #: high-resolution features, if the model has them
    input_size: tuple[int, int]  #: size of the resized image inside the model input (h, w)
    file_name: str = ""  #: the client's file name (informative only)

    @property
    def nbytes(self) -> int:
        """Memory held: the file plus the tensors' storages (a view keeps its whole base)."""
        storages = {}
        for t in (self.features, *(self.high_res or ())):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = max(storage.nbytes(), t.numel() * t.element_size())
        return len(self.data) + sum(storages.values())

    @property
    def original_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def restore(self, predictor: Predictor) -> Predictor:
        """Puts this embedding into ``predictor`` as if it had just encoded the image."""
        predictor.reset_image()
        predictor.features = self.features
        predictor.high_res_features = None if self.high_res is None else list(self.high_res)
        predictor.original_size = self.original_size
        predictor.input_size = self.input_size
        predictor._set_sizes()
        return predictor

    @classmethod
    def from_predictor(
        cls, image_id: str, data: bytes, predictor: Predictor, file_name: str = ""
    ) -> CachedImage:
        """The embedding currently held by ``predictor``."""
        assert predictor.features is not None and predictor.original_size and predictor.input_size
        high = predictor.high_res_features
        return cls(
            id=image_id,
            data=data,
            width=predictor.original_size[1],
            height=predictor.original_size[0],
            features=predictor.features.detach(),
            high_res=None if high is None else tuple(t.detach() for t in high),
            input_size=predictor.input_size,
            file_name=file_name,
        )


class EmbeddingCache:
    """Thread-safe LRU of :class:`CachedImage`, bounded by bytes, with an optional folder."""

    def __init__(
        self,
        max_bytes: int,
        *,
        directory: str | os.PathLike[str] | None = None,
        disk_max_bytes: int = 4 * 2**30,
        fingerprint: str = "model",
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.disk_max_bytes = disk_max_bytes
        self.directory = None if directory is None else Path(directory) / fingerprint
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._disk_lock = threading.Lock()
        self.hits = self.misses = self.disk_hits = self.evictions = 0

    # ------------------------------------------------------------------ memory
    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._entries

    def get(self, image_id: str) -> CachedImage | None:
        """The entry from memory (marked as recently used), else None. Never reads the disk."""
        with self._lock:
            entry = self._entries.get(image_id)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(image_id)
            self.hits += 1
            return entry

    def put(self, entry: CachedImage) -> None:
        """Adds ``entry`` to memory, evicting least recently used entries beyond the bound."""
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(entry.id, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                logger.warning(
                    "image %s needs %d bytes, more than the whole cache (%d): not kept in memory",
                    entry.id[:12],
                    size,
                    self.max_bytes,
                )
                return
            self._entries[entry.id] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1

    def discard(self, image_id: str) -> bool:
        """Removes an image from memory and disk; True if it was in either."""
        with self._lock:
            entry = self._entries.pop(image_id, None)
            if entry is not None:
                self._bytes -= entry.nbytes
        on_disk = False
        if self.directory is not None:
            for path in self._paths(image_id):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    on_disk = True
        return entry is not None or on_disk

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "disk_hits": self.disk_hits,
                "evictions": self.evictions,
                "disk": self.directory is not None,
            }

    # ------------------------------------------------------------------ disk
    def _paths(self, image_id: str) -> tuple[Path, Path]:
        assert self.directory is not None
        return self.directory / f"{image_id}.safetensors", self.directory / f"{image_id}.image"

    def on_disk(self, image_id: str) -> bool:
        return self.directory is not None and all(p.is_file() for p in self._paths(image_id))

    def load(self, image_id: str, predictor: Predictor) -> CachedImage | None:
        """The entry from the folder (then also kept in memory), or None. Blocking I/O."""
        if self.directory is None:
            return None
        emb_path, img_path = self._paths(image_id)
        try:
            data = img_path.read_bytes()
            predictor.load_embedding(emb_path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache files of %s: %s", image_id[:12], exc)
            self.discard(image_id)
            return None
        for path in (emb_path, img_path):
            with contextlib.suppress(OSError):
                os.utime(path)
        entry = CachedImage.from_predictor(image_id, data, predictor)
        with self._lock:
            self.disk_hits += 1
        self.put(entry)
        return entry

    def save(self, entry: CachedImage, predictor: Predictor) -> None:
        """Writes ``entry`` (whose embedding ``predictor`` holds) to the folder, if any."""
        if self.directory is None:
            return
        emb_path, img_path = self._paths(entry.id)
        try:
            with atomic_write(img_path) as fh:
                fh.write(entry.data)
            predictor.save_embedding(emb_path)
        except OSError as exc:  # a full or read-only disk must not fail the request
            logger.warning("could not write the disk cache for %s: %s", entry.id[:12], exc)
            return
        self._prune_disk()

    def _prune_disk(self) -> None:
        assert self.directory is not None
        with self._disk_lock:
            files = []
            for item in os.scandir(self.directory):
                if item.is_file() and not item.name.startswith("."):
                    st = item.stat()
                    files.append((st.st_mtime, st.st_size, Path(item.path)))
            total = sum(size for _, size, _ in files)
            if total <= self.disk_max_bytes:
                return
            # Remove whole images (both files), oldest first.
            stems: dict[str, float] = {}
            for mtime, _, path in files:
                stem = path.name.split(".", 1)[0]
                stems[stem] = max(stems.get(stem, 0.0), mtime)
            sizes: dict[str, int] = {}
            for _, size, path in files:
                stem = path.name.split(".", 1)[0]
                sizes[stem] = sizes.get(stem, 0) + size
            for stem in sorted(stems, key=stems.__getitem__):
                if total <= self.disk_max_bytes:
                    break
                for path in self._paths(stem):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                total -= sizes[stem]
