"""Named model shapes, as data, next to the config that uses them: ``model.preset: NAME`` in a
config fills that section's defaults; explicit keys override.

Sizes are approximate non-embedding parameter counts; the vocabulary comes from the tokenizer.
"""

from __future__ import annotations

from lmforge.errors import UserError

_GPT2 = {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": True}
_LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
          "norm_eps": 1e-5}

_BERT = {**_GPT2, "arch": "encoder", "post_norm": True, "type_vocab_size": 2, "pooler": True, "norm_eps": 1e-12}

_BART = {**_GPT2, "arch": "encoder_decoder", "post_norm": True}

PRESETS: dict[str, dict] = {
    # ~0.8M: nanoGPT's CPU Shakespeare recipe.
    "gpt2-tiny": {**_GPT2, "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256},
    # ~3M: sized for a few minutes on a laptop CPU (the default model's shape, see llama-mini).
    "gpt2-mini": {**_GPT2, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256},
    # ~10M: nanoGPT's GPU Shakespeare-char model.
    "gpt2-small": {**_GPT2, "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
    # GPT-2 124M.
    "gpt2-124m": {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    # ~3M: the default `lmforge train` model: gpt2-mini's shape in Llama's form (tied embeddings, no GQA).
    "llama-mini": {**_LLAMA, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "tie_embeddings": True},
    "llama-tiny": {**_LLAMA, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128, "block_size": 256},
    "llama-small": {**_LLAMA, "n_layer": 6, "n_head": 6, "n_kv_head": 2, "n_embd": 384, "block_size": 256},
    "llama-124m": {**_LLAMA, "n_layer": 12, "n_head": 12, "n_kv_head": 4, "n_embd": 768, "block_size": 1024},
    # BERT's published small shapes (Turc et al. 2019, "Well-Read Students Learn Better": L/H/A), post-norm, with
    # token types and a pooler as BERT has; 128-token context (BERT pretrained 90% of its steps at 128).
    "bert-tiny": {**_BERT, "n_layer": 2, "n_head": 2, "n_embd": 128, "block_size": 128},
    "bert-mini": {**_BERT, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128},
    "bert-small": {**_BERT, "n_layer": 4, "n_head": 8, "n_embd": 512, "block_size": 128},
    # BART-shaped encoder-decoders (post-norm, learned positions, GELU, tied embeddings), n_layer blocks on each side:
    # about the parameters of gpt2-tiny / -mini / -small (a decoder block with cross-attention is ~4/3 of one).
    "seq2seq-tiny": {**_BART, "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 256},
    "seq2seq-mini": {**_BART, "n_layer": 2, "n_head": 4, "n_embd": 256, "block_size": 256},
    "seq2seq-small": {**_BART, "n_layer": 3, "n_head": 6, "n_embd": 384, "block_size": 256},
}


def preset_values(name: str) -> dict:
    """The values of preset ``name``; UserError listing the known ones otherwise."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name])
