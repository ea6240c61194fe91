"""The model: the decoder (``gpt``), the encoder (``encoder``, on the decoder's blocks), their attention kernels
(``attention``), the name tables to and from ``transformers`` (``hf``), task heads (``classifier``) and LoRA adapters
(``lora``)."""

from lmforge.config import ModelConfig
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT, flops_per_token


def build_model(cfg: ModelConfig) -> GPT | Encoder:
    """The model ``cfg.arch`` names, freshly initialized: a :class:`GPT` (decoder) or an :class:`Encoder`."""
    return Encoder(cfg) if cfg.arch == "encoder" else GPT(cfg)


__all__ = ["GPT", "Encoder", "build_model", "flops_per_token"]
