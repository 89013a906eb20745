"""The plug-in API: everything a model family outside this package imports, from one place.

    from pipeline.plugin import AudioOutput, Family, MelSettings

A family package registers its `Family` subclass under the entry-point group
`tts_onnx_pipeline.families` (README, "Writing a family"). The names below are
the contract; where each is defined inside the pipeline may change, this
module's names do not. The built-in families, which live inside
`pipeline.families`, import from the defining modules instead (this module
imports `pipeline.families`, so they cannot import it back).
"""
from __future__ import annotations

from calibration import CalibrationSource, SentenceSource, SentencesParams, SourceContext, SourceParams
from pipeline.core.audio import MelSettings
from pipeline.core.errors import PipelineError
from pipeline.core.feeds import Feeds
from pipeline.core.modelset import GraphFile, ModelSet
from pipeline.evaluation.metrics import AudioMetric, Metric, TokenMetric
from pipeline.evaluation.results import CheckReport, OutputResult
from pipeline.families import (AudioOutput, Exporter, Family, Generated, GenerateRequest, files_key, register,
                               unregister)
from pipeline.formats.targets import FormatInputs, Target

__all__ = [
    "AudioMetric", "AudioOutput", "CalibrationSource", "CheckReport", "Exporter", "Family", "Feeds", "FormatInputs",
    "Generated", "GenerateRequest", "GraphFile", "MelSettings", "Metric", "ModelSet", "OutputResult", "PipelineError",
    "SentenceSource", "SentencesParams", "SourceContext", "SourceParams", "Target", "TokenMetric", "files_key",
    "register", "unregister",
]
