"""A bidirectional Transformer encoder (BERT), top to bottom, on the decoder's parts.

The blocks, norms, MLPs and position choices are :mod:`lmforge.model.gpt`'s; what differs is
that attention sees every position (``SelfAttention(causal=False)``; padding is masked out with
``attention_mask``), and what sits around the blocks:

* embeddings: tokens + learned positions (or RoPE inside attention) + token types (segments,
  ``cfg.type_vocab_size``), normalized when the blocks are post-norm (BERT);
* the masked-LM head (BERT's): dense -> GELU -> norm -> output layer tied to the token embedding,
  with a bias; in training it reads only the masked positions, which are ~15% of all;
* an optional pooler (dense + tanh over the first token, ``[CLS]``), which a classifier reads.

With ``cfg.post_norm`` and learned positions, LayerNorm and GELU it is exactly BERT
(``transformers``' ``BertForMaskedLM``; the name table is in ``lmforge.model.hf``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model.gpt import GPT, Block, Linear, init_weights, make_norm, rope_cache, run_block


class Encoder(nn.Module):
    """Embeddings, ``n_layer`` bidirectional blocks, the masked-LM head and an optional pooler."""

    classifier_bias = True
    """A classification head on an encoder has a bias (BERT's ``classifier`` does)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building an Encoder")
        if cfg.arch != "encoder":
            raise ValueError(f"Encoder needs model.arch=encoder, got {cfg.arch}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd) if cfg.type_vocab_size else None
        # Post-norm blocks end with a norm, so the stream is normalized once more on the way in, never on the way out.
        self.emb_norm = make_norm(cfg) if cfg.post_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.activation_checkpointing: bool | str = False  # see lmforge.model.gpt.run_block
        self.norm_f = None if cfg.post_norm else make_norm(cfg)
        self.head_dense = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.head_norm = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.pooler = Linear(cfg.n_embd, cfg.n_embd) if cfg.pooler else None
        if cfg.pos_embedding == "rope":
            cos, sin = rope_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg)

    set_dropout = GPT.set_dropout

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position and token-type embeddings (they cost no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.wpe, self.wtt) if e is not None)
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, masked: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_types: torch.Tensor | None = None):
        """Masked-LM logits for token ids ``idx`` (B, T).

        masked: (B, K) positions to predict (training: the masked ones); the head then runs on those only and the
            logits are (B, K, vocab). None: every position, (B, T, vocab).
        targets: the original token ids at ``masked`` (B, K) (or at every position, (B, T)); -100 is ignored.
            Returns (logits, loss); with targets the logits come back detached.
        attention_mask: (B, T), 1/True for real tokens, 0 for padding (which no position attends to).
        token_types: (B, T) segment ids; default 0.
        """
        h = self.hidden_states(idx, attention_mask=attention_mask, token_types=token_types)
        if masked is not None:
            h = h.gather(1, masked.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        logits = self.mlm_logits(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits.detach(), loss

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The masked-LM head (BERT's): vocabulary logits for hidden states ``h`` (..., n_embd)."""
        act = F.gelu(self.head_dense(h), approximate="tanh" if self.cfg.mlp == "gelu_tanh" else "none")
        logits = self.lm_head(self.head_norm(act))
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def hidden_states(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_types: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd): what the masked-LM head, the pooler or a task head reads."""
        B, T = idx.shape
        if self.cfg.block_size < T:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        positions = torch.arange(T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = self.rope_cos[positions], self.rope_sin[positions]
        if self.wtt is not None:
            x = x + (self.wtt(token_types) if token_types is not None else self.wtt.weight[0])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys
        for block in self.blocks:
            x = run_block(block, self.activation_checkpointing, x, rope, mask, None)
        return x if self.norm_f is None else self.norm_f(x)

    def sequence_representation(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per right-padded sequence (B, n_embd): the pooler's output over the first token ([CLS]), or
        that token's hidden state without a pooler. What a sequence classifier reads."""
        mask = torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]
        first = self.hidden_states(idx, attention_mask=mask)[:, 0]
        return first if self.pooler is None else torch.tanh(self.pooler(first))

    def token_representations(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, n_embd) of right-padded sequences, padding masked out: what a token classifier
        reads."""
        mask = torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]
        return self.hidden_states(idx, attention_mask=mask)

    @property
    def device(self) -> torch.device:
        return self.head_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_norm.weight.dtype
