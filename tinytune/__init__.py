"""tinytune: quantized, low-memory LLM fine-tuning for consumer GPUs."""

__version__ = "0.1.0"
