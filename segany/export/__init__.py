"""ONNX export of the whole model and an ONNX Runtime backend (extra ``segany[onnx]``)."""

from .export import export_onnx
from .onnx_backend import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend", "export_onnx"]
