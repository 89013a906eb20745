"""Feeds: the inputs of one ONNX Runtime run, by input name. One type for every layer that passes them around."""
from __future__ import annotations

import numpy as np

Feeds = dict[str, np.ndarray]
