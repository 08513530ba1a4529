"""BLIP-2 in plain PyTorch, drop-in with the reference `transformers` classes and checkpoints."""

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, OPTConfig, T5Config
from .features import BatchFeature
from .generation import GenerationConfig
from .image_processing import BlipImageProcessor
from .io.errors import CheckpointError, CheckpointNotFoundError, DeviceMapError
from .io.hub import resolve_checkpoint
from .memory import memory_report, model_memory
from .modeling import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2PreTrainedModel,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)
from .processing import Blip2Processor
from .qformer import Blip2QFormerModel
from .quantization import QuantizationConfig, QuantizationError
from .runner import Blip2Runner
from .tokenizer import Blip2Tokenizer, TextStreamDecoder
from .vision import Blip2VisionModel

__all__ = [
    "Blip2Config", "Blip2VisionConfig", "Blip2QFormerConfig", "OPTConfig", "T5Config", "ConfigError",
    "CheckpointError", "Blip2PreTrainedModel", "Blip2VisionModel", "Blip2QFormerModel", "Blip2Model",
    "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection", "Blip2Processor", "BlipImageProcessor", "Blip2Tokenizer", "BatchFeature",
    "TextStreamDecoder", "GenerationConfig", "Blip2Runner", "CheckpointNotFoundError", "DeviceMapError",
    "resolve_checkpoint", "memory_report", "model_memory", "QuantizationConfig", "QuantizationError",
]
