"""Export a SAM model to two ONNX files: the image encoder, and the prompt encoder + mask
decoder with a dynamic number of prompts (objects) and points per prompt.

``encoder.onnx``
    ``image``: ``1 x 3 x S x S`` float32, normalised and zero-padded (``Sam.preprocess``)
    -> ``image_embeddings`` ``1 x C x S/16 x S/16`` (+ ``high_res_feats_0/1`` for
    encoders with high-resolution features, e.g. segany-lite).
``decoder.onnx``
    ``image_embeddings`` (+ high-res features), ``point_coords`` ``B x N x 2`` float32 in the
    model's input frame, ``point_labels`` ``B x N`` float32 (1 positive, 0 negative,
    -1 padding, 2/3 box top-left/bottom-right corners), ``mask_input`` ``B x 1 x 4h x 4w``,
    ``has_mask_input`` ``1`` (1.0: use ``mask_input``) -> ``low_res_masks`` ``B x 4 x 4h x 4w``
    logits (mask 0 the single-mask output, 1..3 the multimask ones) and ``iou_predictions``
    ``B x 4``. Points come first, then a box's two corners; without a box, one padding point
    (label -1) ends the list, exactly as the prompt encoder arranges its tokens.
``segany_onnx.json``
    the model config and the file names.

The graphs use the reference computation (the fast paths hold shape-dependent choices);
ONNX Runtime applies its own fusions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modeling import common
from ..modeling.sam import Sam

logger = logging.getLogger(__name__)

MANIFEST = "segany_onnx.json"
OPSET = 18


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "ONNX export needs the 'onnx' extra: pip install 'segany[onnx]' "
            f"(missing: {exc.name})"
        ) from exc


class EncoderGraph(nn.Module):
    """The image encoder with its outputs named for export."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.image_encoder(image)
        if isinstance(out, tuple):
            return (out[0], *out[1])
        return (out,)


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder with points and box corners as one labelled point list."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.high_res = sam.mask_decoder.use_high_res_features

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        h, w = pe.input_image_size
        coords = coords + 0.5
        coords = torch.stack([coords[..., 0] / w, coords[..., 1] / h], dim=-1)
        emb = pe.pe_layer._pe_encoding(coords)
        lab = labels.unsqueeze(-1)
        emb = torch.where(lab == -1, torch.zeros_like(emb), emb)
        emb = emb + (lab == -1).to(emb.dtype) * pe.not_a_point_embed.weight
        for i in range(pe.num_point_embeddings):
            emb = emb + (lab == i).to(emb.dtype) * pe._point_weight(i)
        return emb

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        high_res_0: torch.Tensor | None = None,
        high_res_1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Named (not *args): torch.onnx rewrites a varargs entry of dynamic_shapes as a list,
        # which torch.export then refuses for a tuple input.
        pe = self.prompt_encoder
        sparse = self._embed_points(point_coords, point_labels)
        b = point_coords.shape[0]
        gh, gw = pe.image_embedding_size
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, gh, gw)
        dense = has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        if self.high_res and pe.high_res_prompt is not None:
            high_res_0 = high_res_0 + pe.high_res_prompt(  # type: ignore[operator]
                point_coords,
                point_labels,
                mask_input,
                has_mask_input.reshape(-1, 1, 1, 1),
                pe.mask_input_size,
                b,
            )
        return self.mask_decoder.predict_masks(
            image_embeddings,
            pe.get_dense_pe(),
            sparse,
            dense,
            [high_res_0, high_res_1] if self.high_res else None,  # type: ignore[list-item]
        )


@contextmanager
def reference_paths(model: Sam) -> Iterator[None]:
    """The reference computation while exporting (fast paths restored afterwards)."""
    from ..optimize import set_fast_paths

    state = [(m, m.fused) for m in model.modules() if isinstance(getattr(m, "fused", None), bool)]
    onednn = common.ONEDNN_LINEAR
    set_fast_paths(model, False)
    common.ONEDNN_LINEAR = False
    try:
        yield
    finally:
        common.ONEDNN_LINEAR = onednn
        for m, fused in state:
            m.fused = fused
        model.fast_postprocess = True


def export_onnx(
    model: Sam,
    out_dir: str | os.PathLike[str],
    *,
    quantize: bool = False,
    opset: int = OPSET,
) -> Path:
    """Writes ``encoder.onnx``, ``decoder.onnx`` and ``segany_onnx.json`` into ``out_dir``.

    ``quantize``: int8 dynamic quantisation of the weights (ONNX Runtime's quantiser);
    smaller and faster on CPU, approximate. Returns the folder.
    """
    _require_onnx()
    if model.encoder_dtype != torch.float32:
        raise ValueError("export a float32 model (before segany.optimize(precision=...))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.config
    size = model.img_size
    device = model.device
    high_res = model.mask_decoder.use_high_res_features
    with torch.no_grad(), reference_paths(model):
        image = torch.zeros(1, 3, size, size, device=device)
        enc_outputs = EncoderGraph(model)(image)
        enc_names = ["image_embeddings"] + (
            [f"high_res_feats_{i}" for i in range(len(enc_outputs) - 1)] if high_res else []
        )
        _export(
            EncoderGraph(model).eval(),
            (image,),
            out / "encoder.onnx",
            ["image"],
            enc_names,
            None,
            opset,
        )
        mask_size = model.prompt_encoder.mask_input_size
        b, n = 2, 3
        dec_args: tuple[Any, ...] = (
            enc_outputs[0],
            torch.rand(b, n, 2, device=device) * size,
            torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]], device=device),
            torch.zeros(b, 1, *mask_size, device=device),
            torch.zeros(1, device=device),
            *(enc_outputs[1:] if high_res else ()),
        )
        dec_names = [
            "image_embeddings",
            "point_coords",
            "point_labels",
            "mask_input",
            "has_mask_input",
            *enc_names[1:],
        ]
        prompts, points = torch.export.Dim("num_prompts"), torch.export.Dim("num_points")
        dynamic: dict[str, Any] = {
            "image_embeddings": None,
            "point_coords": {0: prompts, 1: points},
            "point_labels": {0: prompts, 1: points},
            "mask_input": {0: prompts},
            "has_mask_input": None,
        }
        if high_res:
            dynamic.update({f"high_res_{i}": None for i in range(len(enc_outputs) - 1)})
        _export(
            DecoderGraph(model).eval(),
            dec_args,
            out / "decoder.onnx",
            dec_names,
            ["low_res_masks", "iou_predictions"],
            dynamic,
            opset,
        )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for name in ("encoder.onnx", "decoder.onnx"):
            tmp = out / f".{name}.fp32"
            os.replace(out / name, tmp)
            try:
                quantize_dynamic(str(tmp), str(out / name), weight_type=QuantType.QInt8)
            finally:
                tmp.unlink(missing_ok=True)
    manifest = {
        "format": "segany-onnx/1",
        "config": cfg.to_dict() if cfg is not None else None,
        "img_size": size,
        "mask_input_size": list(model.prompt_encoder.mask_input_size),
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "encoder": "encoder.onnx",
        "decoder": "decoder.onnx",
        "encoder_outputs": enc_names,
        "quantized": quantize,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    logger.info("exported ONNX model to %s", out)
    return out


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, Any] | None,
    opset: int,
) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,  # folds constants (e.g. zero conv biases) so ORT can fuse BN into Conv
            verbose=False,
        )
        assert program is not None
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
