"""Declarative ONNX graph surgery and quantization for text-to-speech models."""

__version__ = "0.1.0"
