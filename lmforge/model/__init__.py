"""The model: the Transformer (``gpt``), its attention kernels (``attention``), the name tables to
and from ``transformers`` (``hf``), a classification head (``classifier``) and LoRA adapters (``lora``)."""

from lmforge.model.gpt import GPT, flops_per_token

__all__ = ["GPT", "flops_per_token"]
