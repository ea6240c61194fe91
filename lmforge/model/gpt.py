"""A decoder-only Transformer, top to bottom.

One class covers both families, chosen by :class:`~lmforge.config.ModelConfig` fields, not by name:

* GPT-2 style: learned position embeddings, LayerNorm, GELU MLP, biases, tied embeddings.
* Llama style: rotary position embeddings (RoPE), RMSNorm, SwiGLU MLP, grouped-query attention
  (fewer key/value heads than query heads), no biases.

Attention goes through ``lmforge.model.attention.causal_attention``, which leaves the kernel to
``F.scaled_dot_product_attention`` (flash attention on GPUs) except on CPUs, where its kernels are
slow in some precisions and sizes and it picks by measurement (its module docstring says how). For
generation each attention layer can hold a preallocated static KV cache (gpt-fast style): the
prompt is written in one call (prefill), then one token per call.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lmforge.config import ModelConfig
from lmforge.model.attention import causal_attention


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Linear(nn.Linear):
    """``nn.Linear``, except for one input row on a CPU under torch.compile (batch-1 decoding): there the product
    is written as a multiply-and-sum over the weight's rows, which inductor compiles into one vectorized pass that
    streams a bf16 weight at ~13-30 GB/s, where the GEMV kernel the matmul calls reads it at ~8 GB/s (weights
    too many to stay in cache, 2-core AMD EPYC; BENCHMARKS.md, "Decoding against llama.cpp"). Decoding reads every
    weight once per token, so that rate is its speed. Sums in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.device.type != "cpu" or not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (block_size, head_dim) for RoPE, 'rotate half' layout (as in HF Llama)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    t = torch.arange(cfg.block_size, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by position-dependent angles; cos/sin broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer key/value cache: (batch, kv_heads, max_len, head_dim), written at given slots."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.span: int | None = None
        """Slots a per-row update returns (the longest row's length after it); None: all of them."""

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, start: int, end: int) -> KVCache:
        """The cache of rows [start, end), sharing this one's memory (a prefill into one row of a running batch)."""
        return KVCache(self.k[start:end], self.v[start:end])

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v for slots [start, start+T) and return the cache up to start+T.

        ``start`` may be a (B,) tensor: one new token per row, each at its own slot (continuous batching, where
        rows hold sequences of different lengths); then the first B rows come back, their first ``span`` slots,
        and the caller's mask says which of them each row sees.
        """
        if isinstance(start, torch.Tensor):
            rows = torch.arange(k.shape[0], device=k.device)
            # Cast as the slice assignment below does implicitly (index_put does not): a quantized model's Linears
            # give float32 keys under autocast, which a cache in the autocast dtype stores.
            self.k[rows, :, start] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, start] = v[:, :, 0].to(self.v.dtype)
            return self.k[: k.shape[0], :, : self.span], self.v[: k.shape[0], :, : self.span]
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention: causal in a decoder, over every position in an encoder."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # One fused projection for q, k, v: a single GEMM is faster than three small ones.
        self.qkv = Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.bias)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache_start: int | torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.cfg.qk_norm:  # unit-RMS queries and keys: attention logits stay bounded whatever the lr
            q, k = F.rms_norm(q, (self.hd,)), F.rms_norm(k, (self.hd,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache_start is not None:
            assert self.kv_cache is not None, "call GPT.setup_cache() before decoding with a cache"
            k, v = self.kv_cache.update(cache_start, k, v)
        y = causal_attention(q, k, v, mask, self.dropout if self.training else 0.0, causal=self.causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """GELU MLP (GPT-2; exact or tanh-approximated GELU), squared ReLU, or SwiGLU (Llama):
    down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        # For SwiGLU the gate and up projections are fused into one GEMM.
        self.fc = Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=cfg.bias)
        self.proj = Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return F.dropout(self.proj(h), self.dropout, self.training)


class Block(nn.Module):
    """Residual block. Pre-norm (GPT-2, Llama): x + attn(norm(x)), then x + mlp(norm(x)); post-norm (BERT, an encoder
    with ``cfg.post_norm``): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.norm1 = make_norm(cfg)
        self.attn = SelfAttention(cfg, causal)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope, mask, cache_start) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, rope, mask, cache_start))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), rope, mask, cache_start)
        return x + self.mlp(self.norm2(x))


# What selective checkpointing keeps: the outputs of the matrix products and of attention, the work that costs to
# redo. The rest of a block's saved activations (norms, RoPE, the MLP's activation and product, dtype casts,
# dropout) is elementwise: recomputing it in backward frees ~40% of a block's activations at no measured cost
# (GPT-2 124M on a CPU; full checkpointing frees ~90% for 1.14x the step: BENCHMARKS.md, "Activation checkpointing").
_KEPT_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_block(block: nn.Module, checkpointing: bool | str, *args) -> torch.Tensor:
    """``block(*args)``, with its activations recomputed in backward (``train.activation_checkpointing``): all of
    them (True: the block keeps only its input), or all but the products' and attention's outputs ("selective");
    False keeps everything. Checkpointing applies while training with gradients on; the RNG state is replayed, so
    dropout draws the same masks again."""
    if not checkpointing or not block.training or not torch.is_grad_enabled():
        return block(*args)
    if checkpointing == "selective":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products))
    return checkpoint(block, *args, use_reentrant=False)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2's initialization: every Linear and Embedding weight from N(0, 0.02), biases zero, and the projections into
    the residual stream scaled by 1/sqrt(2 * n_layer), so that the residual's variance does not grow with depth (zero
    with ``cfg.zero_init``: every block starts as the identity)."""
    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    model.apply(init)  # children before parents: the order (and so the draws) of the seeded runs before this function
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.0 if cfg.zero_init else 0.02 / math.sqrt(2 * cfg.n_layer))


class GPT(nn.Module):
    """The language model: embeddings, ``n_layer`` blocks, a final norm and the output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a GPT")
        if cfg.arch != "decoder":
            raise ValueError(f"GPT is the decoder; model.arch={cfg.arch} is built by lmforge.model.build_model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.activation_checkpointing: bool | str = False  # see run_block
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos_embedding == "rope":
            cos, sin = rope_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg)
        if cfg.zero_init and not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def set_dropout(self, p: float) -> None:
        """Use dropout probability ``p`` everywhere from now on (fine-tuning a model trained with another)."""
        self.cfg.dropout = self.drop.p = p
        for block in self.blocks:
            block.attn.dropout = block.mlp.dropout = p

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (they cost no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache_start: int | torch.Tensor | None = None, last_only: bool = False):
        """Logits for token ids ``idx`` (B, T).

        targets: (B, T) next-token ids; positions equal to -100 are ignored. Returns (logits, loss);
            with targets the logits come back detached (only the loss is differentiable).
        positions: (B, T) or (T,) position ids; default 0..T-1 (offset by cache_start when decoding).
        mask: boolean (B, 1, T, S) attention mask, True = attend; default causal.
        cache_start: write keys/values into the KV cache from this slot (see setup_cache); a (B,) tensor:
            one token per row, each written at its own slot (pass positions and mask too).
        last_only: compute logits for the last position only (generation needs nothing else).
        """
        x = self.hidden_states(idx, positions=positions, mask=mask, cache_start=cache_start)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        # Training differentiates the loss only. Logits that required grad would be a second output
        # of a compiled graph, and its backward would be handed (and add) a zero gradient of
        # logits' full size: on a CPU that alone costs ~10% of a small model's step.
        return logits.detach(), loss

    def hidden_states(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, cache_start: int | torch.Tensor | None = None) -> torch.Tensor:
        """The final normalized hidden states (B, T, n_embd): what the output head (or a task head) reads."""
        B, T = idx.shape
        if self.cfg.block_size < T and cache_start is None:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        if positions is None:
            start = cache_start or 0
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            # (T,) positions broadcast over batch and heads; (B, T) ones get a head axis.
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rope = (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))
        x = self.drop(x)
        for block in self.blocks:
            x = run_block(block, self.activation_checkpointing, x, rope, mask, cache_start)
        return self.norm_f(x)

    classifier_bias = False
    """A classification head on a decoder has no bias (transformers' ``GPT2ForSequenceClassification`` has none)."""

    def sequence_representation(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per right-padded sequence (B, n_embd): the last real token's hidden state, the only one that
        has read the whole text (right padding after it changes nothing). What a sequence classifier reads."""
        h = self.hidden_states(idx)
        return h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]

    def token_representations(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, n_embd) of right-padded sequences (each token has read those before it)."""
        return self.hidden_states(idx)

    @property
    def device(self) -> torch.device:
        """Where the model is (read from the final norm: a quantized model's embedding holds no float weight)."""
        return self.norm_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point weights."""
        return self.norm_f.weight.dtype

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a static KV cache of max_len slots in every attention layer."""
        for block in self.blocks:
            a = block.attn
            a.kv_cache = KVCache.empty(batch, a.n_kv, max_len, a.hd, dtype or self.dtype, self.device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM appendix B).

    N is the parameter count without position embeddings; the second term is attention's
    score and value matmuls (L layers, H heads of size Q, context T), forward and backward
    (an encoder-decoder's tokens: the source's, with a target as long).
    """
    T = seq_len or cfg.block_size
    # An encoder-decoder's decoder blocks attend twice: to what they wrote and (cross) to the source.
    layers = cfg.n_layer + 2 * cfg.n_decoder_layer * (cfg.arch == "encoder_decoder")
    return 6 * n_params + 12 * layers * cfg.n_head * cfg.head_dim * T
