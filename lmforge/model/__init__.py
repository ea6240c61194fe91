"""The model: the decoder (``gpt``), the encoder (``encoder``, on the decoder's blocks), the encoder-decoder
(``encoder_decoder``, on both), their attention kernels
(``attention``), the name tables to and from ``transformers`` (``hf``), task heads (``classifier``) and LoRA adapters
(``lora``)."""

from lmforge.config import ModelConfig
from lmforge.model.encoder import Encoder
from lmforge.model.encoder_decoder import EncoderDecoder
from lmforge.model.gpt import GPT, flops_per_token


def build_model(cfg: ModelConfig) -> GPT | Encoder | EncoderDecoder:
    """The model ``cfg.arch`` names, freshly initialized: a :class:`GPT` (decoder), an :class:`Encoder` or an
    :class:`EncoderDecoder`."""
    return {"decoder": GPT, "encoder": Encoder, "encoder_decoder": EncoderDecoder}[cfg.arch](cfg)


__all__ = ["GPT", "Encoder", "EncoderDecoder", "build_model", "flops_per_token"]
