"""Speed settings applied to a built model: fast paths, precision, threads, compile, int8.

Everything here runs after building and loading (parameter names never change, except that
int8 quantisation swaps the encoder's linear layers for quantised ones) and every setting is
switchable. The fast paths are on by default and compute the reference function; the others
trade exactness for speed and are off unless asked for::

    model = segany.build_model(checkpoint="sam_vit_b_01ec64.pth")
    segany.optimize(model, precision="bf16", threads=None)   # bf16 encoder, every core
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .modeling.sam import Sam

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_fast_paths(model: Sam, enabled: bool = True) -> Sam:
    """Switches every fast path (fused attention, sub-pixel upscaling, banded MLP, oneDNN
    linears, crop-first mask upscaling, the prompt branch made for kept masks only, low-rank
    image tokens in the decoder) on or off. Off is the reference computation."""
    from .modeling.image_encoder import Attention as EncoderAttention
    from .modeling.mask_decoder import MaskDecoder
    from .modeling.transformer import Attention as DecoderAttention

    for m in model.modules():
        if isinstance(m, (EncoderAttention, DecoderAttention, MaskDecoder)):
            m.fused = enabled
        if isinstance(m, MaskDecoder):
            m.low_rank = enabled
    model.fast_postprocess = enabled
    model.fast_high_res_prompt = enabled
    return model


def precision_supported(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``precision`` runs natively on ``device`` (bf16/fp16 need CPU support or CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if precision == "fp32":
        return True
    if dev.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        ops = torch.ops.mkldnn
        if precision == "bf16":
            return bool(ops._is_mkldnn_bf16_supported())
        return bool(ops._is_mkldnn_fp16_supported())
    return False


def set_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op threads (process-wide) to ``threads``, or to every core this
    process may use when None. Returns the number set."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def optimize(
    model: Sam,
    *,
    precision: str = "fp32",
    fast: bool = True,
    threads: int | None | bool = False,
    compile: bool | str = False,
    quantize: str | None = None,
) -> Sam:
    """Applies speed settings to ``model`` in place and returns it.

    Args:
        precision: "fp32" (default, exact), "bf16" or "fp16": the image encoder's dtype (the
            prompt encoder and mask decoder stay float32; they are cheap). ``ValueError``
            where the device has no native support for it.
        fast: the exact fast paths (:func:`set_fast_paths`).
        threads: False leaves torch's setting alone; None uses every core; an int that many.
        compile: ``torch.compile`` the image encoder and mask decoder (first call slow); a
            string names the compiler backend (default "inductor").
        quantize: "int8" replaces the image encoder's linear layers by dynamically quantised
            ones (CPU, float32 only; approximate).
    """
    set_fast_paths(model, fast)
    if threads is not False:
        set_threads(None if threads is None or threads is True else int(threads))
    device = model.device
    if not precision_supported(precision, device):
        raise ValueError(f"precision {precision!r} is not supported natively on {device}")
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
        if device.type != "cpu" or precision != "fp32":
            raise ValueError("int8 quantisation needs a float32 model on the CPU")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model.image_encoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
    model.image_encoder.to(PRECISIONS[precision])
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        model.image_encoder.compile(backend=backend)
        model.mask_decoder.compile(backend=backend, dynamic=True)
    logger.info(
        "optimize: precision=%s fast=%s threads=%d compile=%s quantize=%s",
        precision,
        fast,
        torch.get_num_threads(),
        compile,
        quantize,
    )
    return model
