"""viq-mllm: train multimodal LLMs on discrete ViQ image codes with megatron-core."""

__version__ = "0.1.0"
