"""Runtimes that chain the ONNX Runtime sessions of a ModelSet."""
