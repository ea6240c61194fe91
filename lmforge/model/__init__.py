"""The Transformer (``gpt``), its named presets, and (later) Hugging Face interop."""

from lmforge.model.gpt import GPT, flops_per_token

__all__ = ["GPT", "flops_per_token"]
