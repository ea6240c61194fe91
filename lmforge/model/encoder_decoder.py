"""An encoder-decoder (sequence-to-sequence) Transformer, top to bottom, on the decoder's parts.

The encoder reads the source with bidirectional attention (:mod:`lmforge.model.encoder`'s blocks,
padding masked out); the decoder writes the target one token at a time: causal self-attention
over what it wrote, then cross-attention over the encoder's output (queries from the decoder,
keys and values from the source), then the MLP (Vaswani et al. 2017). Both sides share one token
embedding, which the output head reuses.

For generation the encoder runs once per input; each decoder block keeps a static KV cache for
its self-attention (gpt-fast style, as the decoder-only model) and the cross-attention's keys and
values, computed once from the encoder's output and read at every step.

With ``cfg.post_norm``, learned positions, LayerNorm, GELU, biases and tied embeddings it is
exactly BART (``transformers``' ``BartForConditionalGeneration``; the name table is in
``lmforge.model.hf``): BART normalizes the embeddings of each side, and the output head's bias
is BART's ``final_logits_bias``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model.attention import causal_attention
from lmforge.model.gpt import Block, KVCache, Linear, init_weights, make_norm, rope_cache, run_block


class CrossAttention(nn.Module):
    """Attention from the decoder's positions (queries) to the encoder's output (keys and values)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q = Linear(cfg.n_embd, self.n_head * self.hd, bias=cfg.bias)
        self.kv = Linear(cfg.n_embd, 2 * self.n_kv * self.hd, bias=cfg.bias)  # one GEMM for both
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        """The encoder output's keys and values, computed once per input for generation (see setup_cache)."""

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n_kv, S, hd) of the encoder's output ``memory`` (B, S, n_embd)."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_kv, self.hd).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k, v = self.memory_kv if memory is None else self.keys_values(memory)
        y = causal_attention(q, k, v, memory_mask, self.dropout if self.training else 0.0, causal=False)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        return F.dropout(self.proj(y), self.dropout, self.training)


class DecoderBlock(Block):
    """The decoder's block: causal self-attention, cross-attention over the encoder's output, MLP; each sublayer
    residual, normalized before (pre-norm) or after the addition (post-norm: BART, the original Transformer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, causal=True)
        self.norm_cross = make_norm(cfg)
        self.cross = CrossAttention(cfg)

    def forward(self, x: torch.Tensor, rope, mask, cache_start, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, rope, mask, cache_start))
            x = self.norm_cross(x + self.cross(x, memory, memory_mask))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), rope, mask, cache_start)
        x = x + self.cross(self.norm_cross(x), memory, memory_mask)
        return x + self.mlp(self.norm2(x))


def _key_mask(src_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1/True for real source tokens -> the boolean (B, 1, 1, S) mask attention takes (True = attend)."""
    return None if src_mask is None else src_mask.bool()[:, None, None, :]


class EncoderDecoder(nn.Module):
    """Shared token embedding; the encoder's ``n_layer`` bidirectional blocks; the decoder's ``n_decoder_layer``
    blocks with cross-attention; the output head, tied to the embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a model")
        if cfg.arch != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs model.arch=encoder_decoder, got {cfg.arch}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        learned = cfg.pos_embedding == "learned"
        self.enc_wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if learned else None
        self.dec_wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if learned else None
        # Post-norm blocks end with a norm, so each side's stream is normalized on the way in, never on the way out.
        self.enc_emb_norm = make_norm(cfg) if cfg.post_norm else None
        self.dec_emb_norm = make_norm(cfg) if cfg.post_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.decoder_blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layer))
        self.activation_checkpointing: bool | str = False  # see lmforge.model.gpt.run_block
        self.enc_norm_f = None if cfg.post_norm else make_norm(cfg)
        self.dec_norm_f = None if cfg.post_norm else make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if not learned:
            cos, sin = rope_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg)

    def set_dropout(self, p: float) -> None:
        """Use dropout probability ``p`` everywhere from now on (fine-tuning a model trained with another)."""
        self.cfg.dropout = self.drop.p = p
        for block in (*self.encoder_blocks, *self.decoder_blocks):
            block.attn.dropout = block.mlp.dropout = p
            if isinstance(block, DecoderBlock):
                block.cross.dropout = p

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (they cost no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.enc_wpe is not None:
            n -= self.enc_wpe.weight.numel() + self.dec_wpe.weight.numel()
        return n

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None, *,
                src_mask: torch.Tensor | None = None):
        """Logits (B, T, vocab) for decoder inputs ``tgt`` (B, T) given source ids ``src`` (B, S).

        targets: (B, T) the next target token at each decoder position; -100 is ignored. Returns (logits, loss);
            with targets the logits come back detached (only the loss is differentiable).
        src_mask: (B, S) 1/True for real source tokens, 0 for padding (which nothing attends to); default all real.
        """
        memory = self.encode(src, src_mask)
        logits = self.decode(tgt, memory, src_mask)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits.detach(), loss

    def _embed(self, idx: torch.Tensor, wpe: nn.Embedding | None, norm: nn.Module | None, start: int = 0):
        """Token (+ learned position) embeddings, normalized when post-norm; and RoPE's tables, or None."""
        T = idx.size(1)
        if self.cfg.block_size < start + T:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.cfg.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if wpe is not None:
            x = x + wpe(positions)
        else:
            rope = self.rope_cos[positions], self.rope_sin[positions]
        if norm is not None:
            x = norm(x)
        return self.drop(x), rope

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, n_embd) for source ids ``src`` (B, S): what cross-attention reads."""
        x, rope = self._embed(src, self.enc_wpe, self.enc_emb_norm)
        mask = _key_mask(src_mask)
        for block in self.encoder_blocks:
            x = run_block(block, self.activation_checkpointing, x, rope, mask, None)
        return x if self.enc_norm_f is None else self.enc_norm_f(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor | None = None, *,
               cache_start: int | None = None, last_only: bool = False) -> torch.Tensor:
        """Vocabulary logits (B, T, vocab) for decoder inputs ``tgt`` (B, T) over the encoder's output ``memory``.

        memory: None when decoding with the cache of :meth:`setup_cache`, which holds its keys and values.
        src_mask: (B, S) the source's real tokens (padding masked out of cross-attention).
        cache_start: write self-attention keys/values into the cache from this slot (positions follow from it).
        last_only: logits for the last position only (generation needs nothing else).
        """
        x, rope = self._embed(tgt, self.dec_wpe, self.dec_emb_norm, cache_start or 0)
        mask = _key_mask(src_mask)
        for block in self.decoder_blocks:
            x = run_block(block, self.activation_checkpointing, x, rope, None, cache_start, memory, mask)
        if self.dec_norm_f is not None:
            x = self.dec_norm_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def setup_cache(self, memory: torch.Tensor, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Prepare decoding over the encoder's output ``memory`` (B, S, n_embd): a static self-attention KV cache of
        ``max_len`` slots per decoder block, and the cross-attention's keys and values, computed once."""
        for block in self.decoder_blocks:
            a = block.attn
            a.kv_cache = KVCache.empty(memory.size(0), a.n_kv, max_len, a.hd, dtype or memory.dtype, memory.device)
            block.cross.memory_kv = block.cross.keys_values(memory)

    def reorder_cache(self, rows: torch.Tensor, length: int) -> None:
        """Keep self-attention cache row ``rows[i]`` as row i (beam search: each beam continues a chosen one), its
        first ``length`` slots (those written: copying the whole static cache each step would cost ~max_len/length
        times more). The cross-attention's keys and values stay: rows are only ever chosen among the beams of the
        same source."""
        for block in self.decoder_blocks:
            cache = block.attn.kv_cache
            for kv in (cache.k, cache.v):
                kv[:, :, :length] = kv[:, :, :length].index_select(0, rows)

    def clear_cache(self) -> None:
        for block in self.decoder_blocks:
            block.attn.kv_cache = None
            block.cross.memory_kv = None

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype
