"""Typed configuration: dataclasses with defaults in code, YAML recipes that override them, and
dotted ``key=value`` overrides from the command line.

Every field has a one-line docstring, and it is user-facing: ``lmforge train --help`` and ``lmforge
finetune --help`` print ``key = default  # docstring`` for every key (:func:`config_help`), and
``lmforge prepare``'s flags are made from :class:`DataConfig`'s fields. Unknown keys and values of
the wrong type raise :class:`~lmforge.errors.UserError` naming the key.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.errors import UserError
from lmforge.presets import PRESETS, preset_values


def _check(key: str, value: Any, ok: bool, expected: str) -> None:
    """UserError naming a config key whose value passes its type but makes no sense."""
    if not ok:
        raise UserError(f"config key '{key}': expected {expected}, got {value!r}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


MAX_CONTEXT = 1 << 20
"""The largest model.block_size accepted: beyond it the position tables alone outgrow any machine."""


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes tokens (``lmforge prepare``)."""

    sources: list[str] = field(default_factory=list)
    """Files, folders (recursive) or globs; empty means the embedded default corpus."""
    dataset_dir: str | None = None
    """An already prepared dataset folder (train.bin/val.bin/meta.json); skips preparation, so the other data.*
    keys (sources, tokenizer, vocab_size, val_fraction, ...) do not apply: it has its own (overriding one is an
    error)."""
    tokenizer: str = "bpe"
    """'bpe' (byte-level BPE trained on the corpus), 'wordpiece' (WordPiece, BERT's, trained on the corpus: for
    encoders, model.arch=encoder), 'char', or a path to a tokenizer.json."""
    vocab_size: int = 4096
    """Vocabulary size for a newly trained BPE or WordPiece tokenizer."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    seed: int = 1337
    """Seed of the train/val split."""
    text_field: str = "text"
    """Field holding the text in .jsonl and .parquet inputs."""
    workers: int = 0
    """Tokenizer worker processes; 0 means one per CPU core."""

    def validate(self) -> None:
        """UserError naming the key whose value cannot work."""
        if not 0 < self.val_fraction < 1:
            raise UserError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.workers < 0:
            raise UserError(f"data.workers must be 0 (one per CPU core) or more, got {self.workers}")
        if self.tokenizer not in ("bpe", "wordpiece", "char") and not Path(self.tokenizer).is_file():
            raise UserError(f"data.tokenizer: expected 'bpe', 'wordpiece', 'char' or a tokenizer.json file, "
                            f"got '{self.tokenizer}' (no such file)")


STANDARD_FAMILIES: dict[str, tuple[str, str, dict[str, tuple]]] = {
    "gpt2": ("learned, layernorm, gelu", "GPT-2", {"arch": ("decoder",), "pos_embedding": ("learned",),
                                                  "norm": ("layernorm",), "mlp": ("gelu", "gelu_tanh")}),
    "llama": ("rope, rmsnorm, swiglu", "Llama", {"arch": ("decoder",), "pos_embedding": ("rope",),
                                                 "norm": ("rmsnorm",), "mlp": ("swiglu",)}),
    "bert": ("learned, layernorm, gelu, post_norm", "BERT", {"arch": ("encoder",), "pos_embedding": ("learned",),
                                                            "norm": ("layernorm",), "mlp": ("gelu", "gelu_tanh"),
                                                            "post_norm": (True,)}),
    "bart": ("learned, layernorm, gelu, post_norm", "BART", {"arch": ("encoder_decoder",),
                                                            "pos_embedding": ("learned",), "norm": ("layernorm",),
                                                            "mlp": ("gelu", "gelu_tanh"), "post_norm": (True,),
                                                            "bias": (True,), "tie_embeddings": (True,)}),
}
"""The architectures other runtimes load: family -> (its shape in words, its name, the values its keys may take).
GPT-2's exact and tanh GELU both count: llama.cpp computes GELU with the tanh form (lmforge.compress.gguf)."""
_NEITHER_FAMILY = {"qk_norm": False, "logit_softcap": 0.0}
"""Options no family has, at the value that leaves them off."""
_SHAPE_KEYS = ("pos_embedding", "norm", "mlp")
"""The keys a model's shape is named by (with post_norm for encoders)."""


def _yaml_word(value: object) -> str:
    """A value as a user writes it on the command line (true, 0, swiglu)."""
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class ModelConfig:
    """The Transformer's shape. ``preset`` sets every architecture key (:data:`ARCHITECTURE_KEYS`) to the preset's
    value (or the default where the preset names none); keys given after it in the same section override it."""

    preset: str | None = None
    """A named preset (lmforge.presets: gpt2-tiny, llama-small, bert-mini, ...): it sets every architecture key; keys
    after it (later in the file's section, or later overrides) change single ones."""
    arch: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    """'decoder': a causal language model that writes text (GPT, Llama); 'encoder': bidirectional attention, trained
    by masked-language modelling, read by classifiers (BERT); 'encoder_decoder': an encoder reads the input and a
    decoder writes the output through cross-attention (sequence-to-sequence: BART, trained by denoising)."""
    vocab_size: int = 0
    """Vocabulary size; 0 means 'take it from the tokenizer'."""
    block_size: int = 256
    """Context length in tokens."""
    n_layer: int = 4
    """Transformer blocks (an encoder-decoder's encoder blocks)."""
    decoder_layers: int = 0
    """Encoder-decoder models: decoder blocks (self-attention, cross-attention, MLP); 0 = as many as n_layer."""
    n_head: int = 4
    """Attention (query) heads per block."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None means n_head (multi-head attention)."""
    n_embd: int = 256
    """Width of the residual stream (the embedding size)."""
    intermediate_size: int | None = None
    """MLP hidden width; None means 4*n_embd (gelu) or the Llama 8/3*n_embd rounded to 64 (swiglu)."""
    pos_embedding: Literal["learned", "rope"] = "learned"
    """Positions: 'learned' absolute embeddings (GPT-2) or 'rope' rotary embeddings (Llama)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """'layernorm' (GPT-2) or 'rmsnorm' (Llama)."""
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = "gelu"
    """'gelu' exact GELU (2x faster on CPUs than tanh), 'gelu_tanh' GPT-2's approximation, 'swiglu' Llama's,
    'relu2' squared ReLU (Primer; modded-nanogpt)."""
    bias: bool = True
    """Biases in linear layers and norms (GPT-2 has them, Llama does not)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    rope_theta: float = 10000.0
    """RoPE base: larger values rotate slower and reach further."""
    norm_eps: float = 1e-5
    """Epsilon added inside the norms."""
    qk_norm: bool = False
    """RMS-normalize queries and keys per head before attention (keeps attention logits bounded at high
    learning rates)."""
    logit_softcap: float = 0.0
    """Cap the output logits smoothly at +-this (cap * tanh(logits / cap), Gemma 2); 0 = off."""
    zero_init: bool = False
    """Start the residual-stream projections (and an untied output head) at zero, so that every block
    starts as the identity (modded-nanogpt)."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention output and MLP output while training."""
    post_norm: bool = False
    """Encoders and encoder-decoders: normalize after each residual addition (BERT, BART, the original Transformer:
    the embeddings normalized too, no final norm) instead of before each sublayer."""
    type_vocab_size: int = 0
    """Encoders: token-type (segment) embeddings (BERT: 2); 0 = none."""
    pooler: bool = False
    """Encoders: a dense + tanh layer over the [CLS] token's hidden state (BERT's pooler), which a classifier reads;
    without it a classifier reads that hidden state itself."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def standard_family(self) -> str | None:
        """'gpt2', 'llama' or 'bert' where the model is one of the architectures that transformers (and for decoders
        llama.cpp) load (:data:`STANDARD_FAMILIES`), else None."""
        return next((f for f in STANDARD_FAMILIES if not self._missing_for(f)), None)

    @property
    def family(self) -> str:
        """The architecture family in words: 'gpt2-style: learned, layernorm, gelu', 'llama-style: rope, rmsnorm,
        swiglu', 'bert-style: encoder, ...', or 'custom: ...' for a mix that is none of them."""
        kind = {"decoder": "", "encoder": "encoder, ", "encoder_decoder": "encoder-decoder, "}[self.arch]
        parts = kind + f"{self.pos_embedding}, {self.norm}, {self.mlp}" + \
            ", post_norm" * self.post_norm + ", qk_norm" * self.qk_norm + \
            f", logit_softcap {self.logit_softcap:g}" * bool(self.logit_softcap)
        family = self.standard_family
        return f"{family}-style: {parts}" if family else f"custom: {parts} ({self._none_of()})"

    def _families(self) -> list[str]:
        """The standard families of this model's arch."""
        return [f for f, (_, _, allowed) in STANDARD_FAMILIES.items() if self.arch in allowed["arch"]]

    def _none_of(self) -> str:
        names = [STANDARD_FAMILIES[f][1] for f in self._families()]
        return f"neither {names[0]} nor {names[1]}" if len(names) == 2 else f"not {names[0]}"

    def export_problem(self) -> str | None:
        """Why no other runtime (transformers, llama.cpp) can load this architecture, naming what it lacks and a
        preset that has it; None for GPT-2, Llama and BERT shapes."""
        if self.standard_family:
            return None
        # The nearer family of the same arch (Llama, the default's, on a tie) and the keys that would make it one.
        family = min(reversed(self._families()), key=lambda f: len(self._missing_for(f)))
        stem = {"bart": "seq2seq"}.get(family, family)  # the presets' names
        preset = next((name for name, v in PRESETS.items() if name.startswith(stem) and
                       (v["n_layer"], v["n_head"], v["n_embd"]) == (self.n_layer, self.n_head, self.n_embd)),
                      f"{stem}-mini")
        keys = _SHAPE_KEYS if self.arch == "decoder" else ("arch", *_SHAPE_KEYS, "post_norm")
        shape = ", ".join(f"{k}={_yaml_word(getattr(self, k))}" for k in (*keys, *_NEITHER_FAMILY)
                          if k in keys or getattr(self, k) != _NEITHER_FAMILY[k])
        described = " nor ".join(f"{STANDARD_FAMILIES[f][1]} ({STANDARD_FAMILIES[f][0]})" for f in self._families())
        return (f"model: {shape} is {'neither ' * (len(self._families()) > 1) or 'not '}{described}; to be "
                f"{STANDARD_FAMILIES[family][1]} it needs {', '.join(self._missing_for(family))}, which preset "
                f"{preset} has")

    def _missing_for(self, family: str) -> list[str]:
        """The ``model.KEY=VALUE`` settings this model lacks to be of ``family``."""
        allowed = STANDARD_FAMILIES[family][2]
        missing = [f"model.{k}={_yaml_word(v[0])}" for k, v in allowed.items() if getattr(self, k) not in v]
        return missing + [f"model.{k}={_yaml_word(v)}" for k, v in _NEITHER_FAMILY.items() if getattr(self, k) != v]

    @property
    def shape_key(self) -> str:
        """Every field that changes what the model computes, as ``key=value,...``: what a timing measured on a model
        of this shape is cached under (the preset's name and dropout change nothing measured)."""
        shape = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("preset", "dropout")}
        return ",".join(f"{k}={v}" for k, v in sorted(shape.items()))

    @property
    def n_decoder_layer(self) -> int:
        """An encoder-decoder's decoder blocks (``decoder_layers``, or as many as the encoder's)."""
        return self.decoder_layers or self.n_layer

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":
            return 64 * ((8 * self.n_embd // 3 + 63) // 64)
        return 4 * self.n_embd

    @property
    def params_without_embeddings(self) -> int:
        """Parameters of the blocks and the final norm, counted from the shape alone (no torch, so that
        ``lmforge recipes`` answers at once): all but the embeddings and the output head, whose size
        comes from the tokenizer. Mirrors lmforge.model.gpt (a test compares the two)."""
        bias = int(self.bias)
        norm = self.n_embd * (2 if self.norm == "layernorm" and self.bias else 1)
        qkv = (self.n_head + 2 * self.kv_heads) * self.head_dim
        fc = (2 if self.mlp == "swiglu" else 1) * self.mlp_hidden
        attn = self.n_embd * qkv + bias * qkv + self.n_embd * self.n_embd + bias * self.n_embd
        mlp = self.n_embd * fc + bias * fc + self.mlp_hidden * self.n_embd + bias * self.n_embd
        blocks = self.n_layer * (2 * norm + attn + mlp)
        if self.arch == "decoder":
            return blocks + norm
        if self.arch == "encoder_decoder":
            # Decoder blocks add cross-attention (queries; keys and values from the encoder's output) and its norm;
            # two more norms: the embeddings' of each side when post-norm, else the final norm of each side.
            kv = 2 * self.kv_heads * self.head_dim
            cross = self.n_embd * (self.n_embd + kv) + bias * (self.n_embd + kv) + self.n_embd * self.n_embd \
                + bias * self.n_embd
            return blocks + self.n_decoder_layer * (3 * norm + attn + cross + mlp) + 2 * norm
        # An encoder: one norm (the embeddings' when post-norm, else the final one), the masked-LM head's dense layer
        # and norm, and the pooler.
        dense = self.n_embd * self.n_embd + bias * self.n_embd
        return blocks + norm + dense + norm + self.pooler * (self.n_embd * self.n_embd + self.n_embd)

    def validate(self) -> None:
        """UserError naming the key whose value cannot work."""
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        _check("model.n_kv_head", self.n_kv_head, self.n_kv_head is None or self.n_kv_head > 0,
               "null or a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise UserError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.kv_heads}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head size, got n_embd/n_head={self.head_dim}")
        _check("model.block_size", self.block_size, self.block_size <= MAX_CONTEXT, f"at most {MAX_CONTEXT:,}")
        _check("model.vocab_size", self.vocab_size, self.vocab_size >= 0, "0 (from the tokenizer) or more")
        _check("model.intermediate_size", self.intermediate_size,
               self.intermediate_size is None or self.intermediate_size > 0, "null or a positive integer")
        _check("model.dropout", self.dropout, 0 <= self.dropout < 1, "a probability in [0, 1)")
        _check("model.logit_softcap", self.logit_softcap, _finite(self.logit_softcap) and self.logit_softcap >= 0,
               "0 (off) or a number > 0")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            _check(f"model.{name}", value, _finite(value) and value > 0, "a finite number > 0")
        _check("model.type_vocab_size", self.type_vocab_size, self.type_vocab_size >= 0, "0 (none) or more")
        _check("model.block_size", self.block_size, self.arch == "decoder" or self.block_size >= 4,
               f"at least 4 for an {self.arch.replace('_', '-')} (room for tokens to mask)")
        _check("model.decoder_layers", self.decoder_layers, self.decoder_layers >= 0,
               "0 (as many as n_layer) or a positive integer")
        if self.decoder_layers and self.arch != "encoder_decoder":
            raise UserError(f"model.decoder_layers={self.decoder_layers} is an encoder-decoder option; this model is "
                            f"a{'n' * (self.arch == 'encoder')} {self.arch} (model.arch=encoder_decoder, or "
                            f"model.decoder_layers=0)")
        only = {"post_norm": (False, ("encoder", "encoder_decoder")), "type_vocab_size": (0, ("encoder",)),
                "pooler": (False, ("encoder",))}
        for name, (off, archs) in only.items():
            if getattr(self, name) != off and self.arch not in archs:
                owner = " and ".join(a.replace("_", "-") + "s" for a in archs)
                raise UserError(f"model.{name}={_yaml_word(getattr(self, name))} is an option of {owner}; this "
                                f"model is a{'n' * (self.arch[0] == 'e')} {self.arch.replace('_', '-')} "
                                f"(model.arch={archs[0]}, or model.{name}={_yaml_word(off)})")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for the hidden matrices) and the learning-rate schedule: linear warmup,
    then cosine decay to ``min_lr`` or warmup-stable-decay."""

    name: Literal["adamw", "muon"] = "adamw"
    """'adamw' for every parameter, or 'muon': torch.optim.Muon (orthogonalized momentum) for the matrices
    inside the blocks, AdamW for embeddings, the output head, gains and biases."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of the warmup)."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (optim.name=muon), on the same schedule as lr."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay, and after it (Muon's is scaled by muon_lr / lr)."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """After the warmup: 'cosine' decay to min_lr over the rest of the run, or 'wsd' (warmup-stable-decay):
    lr held until the last decay_fraction of the run, then a linear decay to min_lr."""
    decay_fraction: float = 0.3
    """The share of the run that the 'wsd' schedule spends decaying."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    decay_steps: int | None = None
    """The step at which the decay ends; None means train.max_steps."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (never of biases and norm gains)."""
    l1: float = 0.0
    """L1 regularization: adds l1 * sum(|w|) over the matrices weight decay applies to (the trained ones) to the
    loss; 0 = off. The logged loss stays the data loss; the penalty is logged as l1_penalty."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def validate(self, prefix: str = "optim") -> None:
        """UserError naming the key whose value cannot work."""
        for name in ("lr", "eps"):
            value = getattr(self, name)
            _check(f"{prefix}.{name}", value, _finite(value) and value > 0, "a finite number > 0")
        for name in ("min_lr", "weight_decay", "grad_clip", "l1"):
            value = getattr(self, name)
            _check(f"{prefix}.{name}", value, _finite(value) and value >= 0, "a finite number >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(f"{prefix}.{name}", value, 0 <= value < 1, "a number in [0, 1)")
        _check(f"{prefix}.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "0 or more")
        _check(f"{prefix}.muon_lr", self.muon_lr, _finite(self.muon_lr) and self.muon_lr > 0, "a finite number > 0")
        _check(f"{prefix}.muon_momentum", self.muon_momentum, 0 <= self.muon_momentum < 1, "a number in [0, 1)")
        _check(f"{prefix}.decay_fraction", self.decay_fraction, 0 < self.decay_fraction <= 1, "a number in (0, 1]")
        _check(f"{prefix}.decay_steps", self.decay_steps, self.decay_steps is None or self.decay_steps > 0,
               "null or a positive integer")


@dataclass
class TrainLoopConfig:
    """How long and how to train, evaluate and checkpoint."""

    max_steps: int = 1000
    """Optimizer steps to train for (with budget_minutes: the most it may plan)."""
    budget_minutes: float | None = None
    """Train for about this many minutes, the learning-rate schedule completed: the step count is planned
    from the pace of the first steps, at most max_steps, and kept by a resume. None: max_steps steps (also
    what a train.max_steps override alone means)."""
    batch_size: int = 16
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process); decided by global_batch_size when that is set."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all processes: grad_accum becomes global_batch_size / (batch_size x
    processes), so a run keeps its batch (and its samples) on any number of processes. None: batch_size x
    grad_accum x processes."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this many minutes of training in this process, whatever max_steps
    says; a --resume gets as many again. None: no limit."""
    eval_interval: int = 250
    """Evaluate on the val split every this many steps (and at the end)."""
    eval_batches: int = 20
    """Batches per periodic evaluation (the final one covers the whole val split)."""
    log_interval: int = 10
    """Print and record the training loss every this many steps."""
    ckpt_interval: int = 500
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    patience: int | None = None
    """Stop after this many evaluations without a new best val loss; None disables early stopping."""
    seed: int = 1337
    """Seed of initialisation, batches and dropout."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:1', 'mps'."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """'auto': bf16 autocast on a CPU where it measured >= 1.2x fp32's speed for this model, else fp32; bf16 on GPUs
    (fp16 + loss scaling on older ones)."""
    compile: bool = False
    """torch.compile the model (the lmforge command falls back to eager with a warning where it cannot)."""
    threads: int = 0
    """CPU threads for PyTorch; 0 leaves PyTorch's default."""
    activation_checkpointing: bool | Literal["selective"] = False
    """Recompute activations in backward, per Transformer block: true keeps only each block's input (the least memory,
    for about one more forward pass); 'selective' keeps the matrix products' and attention's outputs and recomputes
    the rest (norms, RoPE, activations: ~40% of the blocks' activations freed at ~no cost); false keeps everything."""
    on_nonfinite: Literal["halt", "skip"] = "halt"
    """A step with a NaN/Inf loss or gradient: 'halt' (exit 3; the last checkpoint is good) or 'skip' it."""
    max_nonfinite_steps: int = 10
    """With on_nonfinite=skip: halt after this many non-finite steps in a row."""
    mlm_probability: float = 0.15
    """Pretraining an encoder (model.arch=encoder): the share of each sequence's tokens hidden and predicted (BERT:
    0.15; of them 80% become [MASK], 10% a random token, 10% stay)."""
    noise_density: float = 0.3
    """Pretraining an encoder-decoder (model.arch=encoder_decoder): the share of each window's tokens hidden in spans
    that the decoder writes back (BART's text infilling: 0.3)."""
    mean_noise_span: float = 3.0
    """Pretraining an encoder-decoder: the mean length of a hidden span (Poisson; BART: 3). Each span becomes one
    [MASK], so the model also learns how many tokens are missing."""


def _validate_train_loop(tc: TrainLoopConfig, prefix: str = "train") -> None:
    """UserError naming the ``train.*`` key whose value cannot work."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                 "ckpt_interval"):
        value = getattr(tc, name)
        _check(f"{prefix}.{name}", value, value > 0, "a positive integer")
    for name in ("keep_last", "threads"):
        value = getattr(tc, name)
        _check(f"{prefix}.{name}", value, value >= 0, "0 or more")
    _check(f"{prefix}.max_nonfinite_steps", tc.max_nonfinite_steps, tc.max_nonfinite_steps >= 0, "0 or more")
    _check(f"{prefix}.mlm_probability", tc.mlm_probability, 0 < tc.mlm_probability < 1, "a number in (0, 1)")
    _check(f"{prefix}.noise_density", tc.noise_density, 0 < tc.noise_density < 1, "a number in (0, 1)")
    _check(f"{prefix}.mean_noise_span", tc.mean_noise_span, _finite(tc.mean_noise_span) and tc.mean_noise_span >= 1,
           "a number >= 1 (tokens per span; below 1 most spans would be empty insertions)")
    _check(f"{prefix}.global_batch_size", tc.global_batch_size,
           tc.global_batch_size is None or tc.global_batch_size > 0, "null or a positive integer")
    _check(f"{prefix}.patience", tc.patience, tc.patience is None or tc.patience > 0, "null or a positive integer")
    for name in ("max_minutes", "budget_minutes"):
        value = getattr(tc, name)
        _check(f"{prefix}.{name}", value, value is None or (_finite(value) and value > 0), "null or a number > 0")


@dataclass
class ParallelConfig:
    """Data parallelism across the processes torchrun starts (``lmforge train --nproc N`` launches it)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """'ddp': every process holds the whole model and optimizer, gradients are averaged; 'fsdp': FSDP2 shards
    parameters, gradients and optimizer state over the processes (per Transformer block). One process: neither."""


@dataclass
class SampleConfig:
    """Samples printed at the end of training."""

    num_samples: int = 3
    """How many samples to print; 0 prints none."""
    max_new_tokens: int = 200
    """Tokens per sample."""
    prompt: str = ""
    """Text every sample continues; empty starts a new document."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = 50
    """Sample among the k most likely tokens; None means all."""

    def validate(self) -> None:
        """UserError naming the key whose value cannot work."""
        _check("sample.num_samples", self.num_samples, self.num_samples >= 0, "0 or more")
        _check("sample.max_new_tokens", self.max_new_tokens, self.max_new_tokens > 0, "a positive integer")
        _check("sample.temperature", self.temperature, _finite(self.temperature) and self.temperature >= 0,
               "a finite number >= 0 (0 is greedy)")
        _check("sample.top_k", self.top_k, self.top_k is None or self.top_k > 0, "null or a positive integer")


@dataclass
class TrainConfig:
    """Everything ``lmforge train`` needs."""

    out_dir: str = "runs/lmforge"
    """Run directory; if it already holds a run (and --resume is not given) a numbered sibling is used."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class FinetuneDataConfig:
    """Examples for ``lmforge finetune``: JSONL for SFT and token classification, CSV or JSONL for classification."""

    train: str = ""
    """Training examples (.jsonl; .csv too for classification)."""
    val: str | None = None
    """Validation examples; None holds out val_fraction of the training file."""
    val_fraction: float = 0.1
    """Fraction of the training file held out for validation when no val file is given."""
    seed: int = 1337
    """Seed of the held-out split (when no val file is given)."""
    prompt_field: str = "prompt"
    """SFT: the field holding a record's user turn (with response_field)."""
    response_field: str = "response"
    """SFT: the field holding the answer to learn."""
    messages_field: str = "messages"
    """SFT: the field holding a list of {role, content} messages (instead of prompt + response)."""
    text_field: str = "text"
    """Classification: the field holding the text."""
    label_field: str = "label"
    """Classification: the field holding its label."""
    tokens_field: str = "tokens"
    """Token classification: the field holding a record's words (a list of strings)."""
    tags_field: str = "tags"
    """Token classification: the field holding one tag per word (a list of strings as long as the words)."""
    max_length: int | None = None
    """Tokens per example (longer ones are truncated and counted); None means the model's context."""
    packing: bool = False
    """SFT: pack several short examples into each row (attention never crosses examples) instead of padding."""
    chat_template: str | None = None
    """SFT: a Jinja chat template file; None: the base model's own, else lmforge's default (### User/Assistant)."""
    skip_bad_lines: bool = False
    """Skip (and count) records that are not valid JSON/CSV or lack a field, instead of stopping."""
    eval_generations: int = 50
    """SFT: val examples answered greedily at the end to report exact match; 0 disables."""

    def validate(self) -> None:
        """UserError naming the key whose value cannot work."""
        _check("data.val_fraction", self.val_fraction, 0 < self.val_fraction < 1, "a number between 0 and 1")
        _check("data.max_length", self.max_length, self.max_length is None or self.max_length > 0,
               "null or a positive integer")
        _check("data.eval_generations", self.eval_generations, self.eval_generations >= 0, "0 or more")


@dataclass
class LoraSettings:
    """Low-rank adapters (LoRA, through ``peft``); rank 0 fine-tunes every weight instead."""

    rank: int = 0
    """Rank of the adapters; 0 disables LoRA (every weight is trained)."""
    alpha: float = 16.0
    """Scale of the adapters' update: alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc"])
    """Linear layers that get adapters (names as in lmforge.model.gpt: qkv, proj, fc)."""
    merge: bool = False
    """At the end, also write full weights with the adapters merged in (no base model needed to load)."""

    def validate(self) -> None:
        """UserError naming the key whose value cannot work."""
        _check("lora.rank", self.rank, self.rank >= 0, "0 (no LoRA) or more")
        _check("lora.alpha", self.alpha, _finite(self.alpha) and self.alpha > 0, "a finite number > 0")
        _check("lora.dropout", self.dropout, 0 <= self.dropout < 1, "a probability in [0, 1)")


@dataclass
class FinetuneConfig:
    """Everything ``lmforge finetune`` needs; ``model`` is copied from the base when the run starts."""

    task: Literal["sft", "classify", "token_classify", "seq2seq"] = "sft"
    """'sft': chat answers (JSONL); 'classify': a label per text (CSV or JSONL); 'token_classify': a tag per word
    (JSONL words and tags: NER, part of speech); 'seq2seq': a target text per source text on an encoder-decoder base
    (JSONL or CSV of prompt + reference, as lmforge app writes them)."""
    base: str = ""
    """The model to start from: an lmforge run or checkpoint directory, or a Hugging Face folder."""
    out_dir: str = "runs/finetune"
    """Run directory; if it already holds a run (and --resume is not given) a numbered sibling is used."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    class_weights: str | list[float] | None = None
    """Classification: loss weight per class (in sorted label order), or 'balanced'; None = equal."""
    dropout: float | None = None
    """Dropout while fine-tuning; None keeps the base model's model.dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model's shape, copied from it when the run starts (so no model.* key can be set)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                                                   weight_decay=0.0))
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(max_steps=300, batch_size=8,
                                                                           eval_interval=100, ckpt_interval=100))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# --------------------------------------------------------------------------------------------------
# Loading: dict/YAML -> dataclass, with type checking and key names in every error


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless, else raise UserError naming key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except UserError:
                pass
        raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise UserError(f"config key '{key}': expected one of {choices}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # a single source given on the command line
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e8 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{key}': expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _type_name(tp: Any) -> str:
    """A union's members as a user writes them: ``int or null``, ``true, false or 'selective'``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = []
    for a in args:
        if typing.get_origin(a) is Literal:
            names += [repr(v) for v in typing.get_args(a)]
        else:
            names.append("true or false" if a is bool else getattr(a, "__name__", str(a)))
    return " or ".join(names) + (" or null" if len(args) < len(typing.get_args(tp)) else "")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    where = f"'{prefix}'" if prefix else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section {where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = _apply_preset(data, prefix) if cls is ModelConfig else dict(data)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise UserError(f"unknown config key '{full}' (known keys in {where}: {known})")
        kwargs[key] = _check_value(value, hints[key], full)
    return cls(**kwargs)


ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("preset", "vocab_size",
                                                                                              "dropout"))
"""The model keys a preset sets (the vocabulary comes from the tokenizer; dropout is a training setting)."""


def _apply_preset(data: dict, prefix: str) -> dict:
    """A model section with its preset applied where it stands: the preset sets every architecture key (its value,
    else the default), over the keys before it; the keys after it override it."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in ARCHITECTURE_KEYS}
    out: dict = {}
    for key, value in data.items():
        if key == "preset" and value is not None:
            name = _check_value(value, str, f"{prefix}.preset" if prefix else "preset")
            out.update({**defaults, **preset_values(name)})
        out[key] = value
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so 3, 1e-3, true, [a, b] work)."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key=value, e.g. train.max_steps=500")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip().split("."), value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"config file '{p}' is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}': expected a mapping of keys at the top level")
    return data


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deepcopy_dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise UserError(f"override '{text}': '{k}' is not a section")
            node = child
        node.pop(keys[-1], None)  # set at the end of its section: after a preset named before it (ModelConfig)
        node[keys[-1]] = value
    return data


def _deepcopy_dict(d: dict) -> dict:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}


RECIPES_DIR = Path(__file__).parent / "configs"
DEFAULT_RECIPE = "default"
"""The recipe ``lmforge train`` runs without -c (``train --help`` shows its values); the apps train a missing
base with it."""


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a shipped recipe (``shakespeare-char``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    raise UserError(f"config '{name}' does not exist (expected a YAML file or a shipped recipe: {known})")


def shipped_recipes() -> dict[str, str]:
    """Each shipped recipe's name (what -c takes) and its description: the first sentence of its leading comment,
    whole (the comment's lines joined, up to the first full stop outside brackets)."""
    recipes = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        recipes[path.stem] = _first_sentence(_leading_comment(path.read_text(encoding="utf-8")))
    return recipes


def _leading_comment(text: str) -> str:
    """The prose of a file's leading comment, its lines joined; it ends at the first line that is not a comment or
    is an indented example (``#   lmforge train ...``)."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        words.append(line.lstrip("#").strip())
    return " ".join(words)


def _first_sentence(text: str) -> str:
    """``text`` up to its first full stop that is outside brackets and followed by a space or the end (so that
    "~1.85" or "config/x.py" do not end it); all of ``text`` if it has none."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if char == "." and depth <= 0 and text[i + 1:i + 2] in ("", " "):
            return text[:i + 1]
    return text


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults in code, then the YAML file (or shipped recipe), then the dotted overrides; validated."""
    data = load_yaml(resolve_config_path(path)) if path else {}
    data = merge_overrides(data, overrides or [])
    cfg = from_dict(TrainConfig, data)
    keys = [".".join(parse_override(text)[0]) for text in overrides or []]
    if "train.max_steps" in keys and "train.budget_minutes" not in keys:
        # Asked for a step count, on the command line: that many steps, not a recipe's time budget.
        cfg.train.budget_minutes = None
    validate_train_config(cfg)
    _check_no_moot_data_overrides(cfg, keys)
    return cfg


def _check_no_moot_data_overrides(cfg: TrainConfig, keys: list[str]) -> None:
    """UserError when an override (``keys``: the dotted keys the overrides set) sets a data.* key that a prepared
    dataset (data.dataset_dir) makes moot: those keys say how to prepare one, and the prepared one has its own
    tokenizer and split. Only the overrides are checked, because only there does a key mean the user's intent: a
    recipe's data.* values are what it prepares with when it has no dataset_dir, and a run's config.yaml (what
    --resume loads) holds both."""
    if not cfg.data.dataset_dir:
        return
    for key in keys:
        if key.startswith("data.") and key != "data.dataset_dir":
            raise UserError(f"'{key}' has no effect with data.dataset_dir='{cfg.data.dataset_dir}': a prepared dataset "
                            f"has its own tokenizer and split (drop '{key}', or prepare again: lmforge prepare)")


def validate_train_config(cfg: TrainConfig) -> None:
    """Every value of a pretraining config checked by meaning (ranges, finiteness, divisibility)."""
    cfg.data.validate()
    cfg.model.validate()
    cfg.optim.validate()
    _validate_train_loop(cfg.train)
    cfg.sample.validate()


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None,
                         resume: bool = False) -> FinetuneConfig:
    """Like :func:`load_train_config`, for ``lmforge finetune``.

    The model comes from the base, so ``model.*`` keys are refused (``dropout`` is the fine-tuning
    setting that exists); when resuming, the run's own config.yaml holds the base's model section,
    and only the overrides are checked.
    """
    data = load_yaml(resolve_config_path(path)) if path else {}
    given = [parse_override(o)[0] for o in overrides or []]
    if not resume:
        given += _key_paths(data)
    model_keys = sorted(".".join(k) for k in given if k[0] == "model")
    if model_keys:
        raise UserError(f"finetune takes the model from its base, so '{model_keys[0]}' cannot be set; "
                        f"the one model setting fine-tuning honours is dropout=P")
    cfg = from_dict(FinetuneConfig, merge_overrides(data, overrides or []))
    if not cfg.base:
        raise UserError("finetune needs a base model: set base=RUN_DIR (an lmforge run or a Hugging Face folder)")
    if not cfg.data.train:
        raise UserError("finetune needs training examples: set data.train=FILE.jsonl")
    validate_finetune_config(cfg)
    return cfg


def validate_finetune_config(cfg: FinetuneConfig) -> None:
    """Every value of a fine-tuning config checked by meaning (the model's come from the base)."""
    cfg.data.validate()
    cfg.lora.validate()
    cfg.optim.validate()
    _validate_train_loop(cfg.train)
    _check("dropout", cfg.dropout, cfg.dropout is None or 0 <= cfg.dropout < 1, "null or a probability in [0, 1)")
    if cfg.data.packing and cfg.task != "sft":
        raise UserError(f"data.packing=true packs chat examples into rows (task=sft); task={cfg.task} pads each batch "
                        f"instead (leave data.packing out)")


def _key_paths(data: dict, prefix: tuple[str, ...] = ()) -> typing.Iterator[list[str]]:
    """The dotted key paths of a nested dict's leaves (a section given as a whole counts as one)."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _key_paths(value, (*prefix, key))
        else:
            yield [*prefix, key]


def to_yaml(cfg: Any) -> str:
    """The config as config.yaml holds it."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg), encoding="utf-8")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


# --------------------------------------------------------------------------------------------------
# Help from the code: field docstrings


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), on one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_help(cls: type, prefix: str = "", hide: frozenset[str] = frozenset(),
                values: dict | None = None) -> list[str]:
    """``key = value  # what it does`` for every field of a config, sections as ``[section]`` headers
    (the section's docstring: its field's, else its class's); the values are ``values`` (a config as a
    dict, e.g. a recipe's) or else the defaults in code; ``hide``: sections listed without keys."""
    lines = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            section_doc = docs.get(f.name) or " ".join((hints[f.name].__doc__ or "").split())
            lines += ["", f"[{key}]  {section_doc}"]
            lines += [] if f.name in hide else config_help(hints[f.name], key + ".",
                                                              values=None if values is None else values[f.name])
            continue
        value = field_default(f) if values is None else values[f.name]
        lines.append(f"  {key} = {value!r}  # {docs.get(f.name, '')}")
    return lines
