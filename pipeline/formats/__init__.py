"""Deployment formats beside ONNX (a recipe's `targets:`): the target contract, GGUF, TorchScript, Core ML."""
