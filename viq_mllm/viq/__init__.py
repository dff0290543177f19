"""The ViQ tokenizer: native-resolution SigLIP2 encoder, position-aware head-wise FSQ, code embedder, decoder.

Usable on its own (no megatron import)::

    from viq_mllm.viq import ViQTokenizer, FSQ
"""

from viq_mllm.viq.config import ViQConfig, config_for
from viq_mllm.viq.fsq import FSQ, PRESETS
from viq_mllm.viq.preprocess import ImageInputError
from viq_mllm.viq.projector import PoolingProjector, visual_positions
from viq_mllm.viq.tokenizer import ViQTokenizer

__all__ = ["FSQ", "PRESETS", "ImageInputError", "PoolingProjector", "ViQConfig", "ViQTokenizer", "config_for",
           "visual_positions"]
