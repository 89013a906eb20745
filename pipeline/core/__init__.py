"""The core: what every other layer stands on and nothing model-specific.

Errors, ONNX files and sessions, the graph toolkit, blocks, model sets, recipes,
feeds, precision, hashing, audio, KV caches, progress. It imports no other layer
of the pipeline and no family (import-linter contracts in pyproject.toml).
"""
