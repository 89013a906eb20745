"""Exporters: PyTorch models written out as a ModelSet of ONNX graphs, block by block."""
