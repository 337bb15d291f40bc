"""Run an exported model (see :mod:`segany.export.export`) with ONNX Runtime.

:class:`OnnxRuntimeBackend` needs only numpy and onnxruntime; ``Predictor(model,
backend="onnxruntime")`` and ``AutomaticMaskGenerator(model, backend="onnxruntime")`` use it
for the encoder and the decoder and keep the rest (resizing, prompts, upscaling, masks).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .export import MANIFEST


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "the onnxruntime backend needs the 'onnx' extra: pip install 'segany[onnx]'"
        ) from exc
    return onnxruntime


class OnnxRuntimeBackend:
    """The two ONNX Runtime sessions of an exported model.

    Args:
        export_dir: a folder written by :func:`segany.export.export_onnx`.
        threads: intra-op threads of each session (None: ONNX Runtime's default, every core).
        providers: execution providers (default: CPU).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        ort = _ort()
        folder = Path(export_dir)
        try:
            self.manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder} is not a segany ONNX export: {exc}") from exc
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(
            str(folder / self.manifest["encoder"]), opts, providers=providers
        )
        self.decoder = ort.InferenceSession(
            str(folder / self.manifest["decoder"]), opts, providers=providers
        )
        self.img_size = int(self.manifest["img_size"])
        self.mask_input_size = tuple(self.manifest["mask_input_size"])
        self._decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        quantize: bool = False,
        directory: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> OnnxRuntimeBackend:
        """Exports ``model`` (into ``directory``, else a temporary folder kept while this
        backend lives) and opens it."""
        from .export import export_onnx

        tmp = None
        if directory is None:
            tmp = tempfile.TemporaryDirectory(prefix="segany-onnx-")
            directory = tmp.name
        export_onnx(model, directory, quantize=quantize)
        backend = cls(directory, threads=threads)
        backend._tmp = tmp
        return backend

    def encode(self, image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """``1 x 3 x S x S`` normalised padded float32 image -> (embedding, high-res features
        or None)."""
        outs = self.encoder.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        return outs[0], (list(outs[1:]) or None)

    def decode(
        self,
        features: np.ndarray,
        high_res: list[np.ndarray] | None,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """All four masks' low-res logits ``B x 4 x 4h x 4w`` and IoU predictions ``B x 4``.

        ``point_coords`` ``B x N x 2`` in the model's input frame, ``point_labels`` ``B x N``
        (1, 0, -1 padding, 2/3 box corners), ``mask_input`` ``B x 1 x 4h x 4w`` or None.
        """
        b = point_coords.shape[0]
        has_mask = mask_input is not None
        if mask_input is None:
            mask_input = np.zeros((b, 1, *self.mask_input_size), dtype=np.float32)
        feeds = {
            "image_embeddings": np.ascontiguousarray(features, dtype=np.float32),
            "point_coords": np.ascontiguousarray(point_coords, dtype=np.float32),
            "point_labels": np.ascontiguousarray(point_labels, dtype=np.float32),
            "mask_input": np.ascontiguousarray(mask_input, dtype=np.float32),
            "has_mask_input": np.array([1.0 if has_mask else 0.0], dtype=np.float32),
        }
        for i, f in enumerate(high_res or []):
            name = f"high_res_feats_{i}"
            if name in self._decoder_inputs:
                feeds[name] = np.ascontiguousarray(f, dtype=np.float32)
        low, iou = self.decoder.run(None, feeds)
        return low, iou
