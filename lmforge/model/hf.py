"""Hugging Face `transformers` mapping, in memory: configs both ways, and parameter names as data.

GPT-2 style models map to ``GPT2LMHeadModel``, Llama style ones to ``LlamaForCausalLM``; Mistral
and Qwen2 configs (Llama-shaped, with their own theta/GQA/bias choices) import too. BERT-style
encoders map to ``BertForMaskedLM``, and a classifier on one to ``BertForSequenceClassification``
(a ``BertModel``, without the masked-LM head, imports too). BART-style encoder-decoders map to
``BartForConditionalGeneration`` (a ``BartModel``, without the output head's bias, imports too).

The weights map through one :class:`NameTable` per family (:data:`GPT2`, :data:`LLAMA`,
:data:`BERT`, :data:`BART`): our parameter name -> theirs, with ``{i}`` for the layer index (``{j}``
for an encoder-decoder's decoder layers), plus declarative notes on what is more than a rename:

* fused splits (:class:`Split`): our ``qkv`` rows are [q; k; v], a SwiGLU ``fc`` is [gate; up], a
  cross-attention's ``kv`` is [k; v];
* transposes: GPT-2's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``;
* key/value expansion: GPT-2 has no grouped-query attention, so a GPT-2-style model with fewer
  key/value heads exports with each key/value head repeated for its query heads (the same
  function, as multi-head attention);
* biases: GPT-2 always has them (a bias-free model exports zeros; import requires them); Llama's
  exist when ``cfg.bias`` (import fills missing ones with zeros: Qwen2 has q/k/v biases only);
* an optional name prefix (GPT-2's ``transformer.``: a bare ``GPT2Model`` lacks it) and a head that
  may be absent (then it is the tied embedding);
* parts a model or folder may lack (BERT's pooler; a bare ``BertModel``'s masked-LM head, which an
  import then leaves freshly initialized), names a folder may hold a tensor under instead (aliases),
  a table BERT always has and ours may lack (token types: exported as one row of zeros), and the
  classifier head's names;
* layouts: BART's learned positions start at row 2 of its table (``BartLearnedPositionalEmbedding``:
  two rows in front, unused: written as zeros), and its output bias ``final_logits_bias`` is one row
  (1, vocab).

:func:`map_to_hf` and :func:`map_from_hf` apply a table in either direction. Our RoPE uses HF
Llama's 'rotate half' layout, so no permutation of q/k is needed. Folders on disk: ``lmforge.interop``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmforge import rundir
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model import build_model
from lmforge.model.classifier import SequenceClassifier
from lmforge.model.encoder import Encoder
from lmforge.model.encoder_decoder import EncoderDecoder
from lmforge.model.gpt import GPT

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "bert", "bart")
_GELU = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_GELU_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

BERT_ARCHITECTURES = {"BertForMaskedLM": "mlm", "BertForPreTraining": "mlm", "BertModel": "mlm",
                      "BertForSequenceClassification": "classify"}
"""The BERT classes (config.json's ``architectures``) that import, and the task of what they become: an Encoder
(``BertForPreTraining``'s next-sentence head is left out) or a SequenceClassifier on one."""
BART_ARCHITECTURES = ("BartForConditionalGeneration", "BartModel")
"""The BART classes that import, as an EncoderDecoder (a ``BartModel``'s output head: the tied embedding, no bias)."""
AUTO_CLASSES = {"lm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM",
                "classify": "AutoModelForSequenceClassification"}
"""The ``transformers`` auto class that loads an export, by the task of the model exported."""
BART_NORM_EPS = 1e-5
"""BART's LayerNorm epsilon: torch's default, which no BartConfig key changes."""


@dataclass(frozen=True)
class Split:
    """One of our fused tensors that HF stores as separate ones, stacked along dim 0 in this order.

    rows names each part's row count: "q" (query heads x head_dim), "kv" (key/value heads x
    head_dim) or "mlp" (the MLP's hidden size).
    """

    parts: tuple[str, ...]
    rows: tuple[str, ...]


@dataclass(frozen=True)
class NameTable:
    """How one family's ``transformers`` parameter names relate to ours (``{i}``: layer index)."""

    names: dict[str, str | Split]  # ours -> theirs, in state-dict order
    transposed: frozenset[str] = frozenset()  # ours that they store as (in, out): GPT-2's Conv1D
    kv_expanded: frozenset[str] = frozenset()  # ours whose k/v heads are repeated per query head on export
    biases_always: bool = False  # they always have biases: export writes zeros, import requires them
    optional_prefix: str = ""  # import also accepts their names without this prefix
    head_optional: bool = False  # import takes the embedding when lm_head is absent, tied or not
    optional: frozenset[str] = frozenset()  # ours that a model or a folder may lack: skipped both ways where absent
    aliases: dict[str, str] = field(default_factory=dict)  # theirs -> the name a folder may hold it under instead
    absent_as_zeros: frozenset[str] = frozenset()  # ours a model may lack that they always hold: exported as zeros
    classifier: dict[str, str] = field(default_factory=dict)  # a SequenceClassifier's head: ours -> theirs
    leading_rows: dict[str, int] = field(default_factory=dict)  # ours -> unused rows they hold in front (zeros out)
    as_row: frozenset[str] = frozenset()  # ours (1-D) that they hold as one row (1, n)


GPT2 = NameTable(
    names={
        "wte.weight": "transformer.wte.weight",
        "wpe.weight": "transformer.wpe.weight",
        "blocks.{i}.norm1.weight": "transformer.h.{i}.ln_1.weight",
        "blocks.{i}.norm1.bias": "transformer.h.{i}.ln_1.bias",
        "blocks.{i}.norm2.weight": "transformer.h.{i}.ln_2.weight",
        "blocks.{i}.norm2.bias": "transformer.h.{i}.ln_2.bias",
        "blocks.{i}.attn.qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
        "blocks.{i}.attn.qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
        "blocks.{i}.attn.proj.weight": "transformer.h.{i}.attn.c_proj.weight",
        "blocks.{i}.attn.proj.bias": "transformer.h.{i}.attn.c_proj.bias",
        "blocks.{i}.mlp.fc.weight": "transformer.h.{i}.mlp.c_fc.weight",
        "blocks.{i}.mlp.fc.bias": "transformer.h.{i}.mlp.c_fc.bias",
        "blocks.{i}.mlp.proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
        "blocks.{i}.mlp.proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
        "norm_f.weight": "transformer.ln_f.weight",
        "norm_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    transposed=frozenset({"blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.proj.weight",
                          "blocks.{i}.mlp.fc.weight", "blocks.{i}.mlp.proj.weight"}),
    kv_expanded=frozenset({"blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.bias"}),
    biases_always=True,
    optional_prefix="transformer.",
    head_optional=True,
)

_QKV = ("q", "kv", "kv")
_GATE_UP = ("mlp", "mlp")

# Llama, Mistral and Qwen2 (one layout).
LLAMA = NameTable(
    names={
        "wte.weight": "model.embed_tokens.weight",
        "blocks.{i}.norm1.weight": "model.layers.{i}.input_layernorm.weight",
        "blocks.{i}.norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blocks.{i}.attn.qkv.weight": Split(("model.layers.{i}.self_attn.q_proj.weight",
                                             "model.layers.{i}.self_attn.k_proj.weight",
                                             "model.layers.{i}.self_attn.v_proj.weight"), _QKV),
        "blocks.{i}.attn.proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "blocks.{i}.mlp.fc.weight": Split(("model.layers.{i}.mlp.gate_proj.weight",
                                           "model.layers.{i}.mlp.up_proj.weight"), _GATE_UP),
        "blocks.{i}.mlp.proj.weight": "model.layers.{i}.mlp.down_proj.weight",
        # Biases (only with cfg.bias) after the weights: a missing one is zeros of its weight's rows.
        "blocks.{i}.attn.qkv.bias": Split(("model.layers.{i}.self_attn.q_proj.bias",
                                           "model.layers.{i}.self_attn.k_proj.bias",
                                           "model.layers.{i}.self_attn.v_proj.bias"), _QKV),
        "blocks.{i}.attn.proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
        "blocks.{i}.mlp.fc.bias": Split(("model.layers.{i}.mlp.gate_proj.bias",
                                         "model.layers.{i}.mlp.up_proj.bias"), _GATE_UP),
        "blocks.{i}.mlp.proj.bias": "model.layers.{i}.mlp.down_proj.bias",
        "norm_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
)

_L = "bert.encoder.layer.{i}."
_QQQ = ("q", "q", "q")  # BERT has no grouped-query attention: fewer key/value heads export repeated (kv_expanded)

# BertForMaskedLM; BertForSequenceClassification's backbone and classifier (without the masked-LM head); a
# BertModel (no masked-LM head, no "bert." prefix). Post-norm: our norm1 follows attention, norm2 the MLP.
BERT = NameTable(
    names={
        "wte.weight": "bert.embeddings.word_embeddings.weight",
        "wpe.weight": "bert.embeddings.position_embeddings.weight",
        "wtt.weight": "bert.embeddings.token_type_embeddings.weight",
        "emb_norm.weight": "bert.embeddings.LayerNorm.weight",
        "emb_norm.bias": "bert.embeddings.LayerNorm.bias",
        "blocks.{i}.attn.qkv.weight": Split((_L + "attention.self.query.weight", _L + "attention.self.key.weight",
                                             _L + "attention.self.value.weight"), _QQQ),
        "blocks.{i}.attn.qkv.bias": Split((_L + "attention.self.query.bias", _L + "attention.self.key.bias",
                                           _L + "attention.self.value.bias"), _QQQ),
        "blocks.{i}.attn.proj.weight": _L + "attention.output.dense.weight",
        "blocks.{i}.attn.proj.bias": _L + "attention.output.dense.bias",
        "blocks.{i}.norm1.weight": _L + "attention.output.LayerNorm.weight",
        "blocks.{i}.norm1.bias": _L + "attention.output.LayerNorm.bias",
        "blocks.{i}.mlp.fc.weight": _L + "intermediate.dense.weight",
        "blocks.{i}.mlp.fc.bias": _L + "intermediate.dense.bias",
        "blocks.{i}.mlp.proj.weight": _L + "output.dense.weight",
        "blocks.{i}.mlp.proj.bias": _L + "output.dense.bias",
        "blocks.{i}.norm2.weight": _L + "output.LayerNorm.weight",
        "blocks.{i}.norm2.bias": _L + "output.LayerNorm.bias",
        "pooler.weight": "bert.pooler.dense.weight",
        "pooler.bias": "bert.pooler.dense.bias",
        "head_dense.weight": "cls.predictions.transform.dense.weight",
        "head_dense.bias": "cls.predictions.transform.dense.bias",
        "head_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "head_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "lm_head.weight": "cls.predictions.decoder.weight",
        "lm_head.bias": "cls.predictions.decoder.bias",
    },
    kv_expanded=frozenset({"blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.bias"}),
    biases_always=True,
    optional_prefix="bert.",
    head_optional=True,
    optional=frozenset({"pooler.weight", "pooler.bias", "head_dense.weight", "head_dense.bias", "head_norm.weight",
                        "head_norm.bias", "lm_head.weight", "lm_head.bias"}),
    # Tied (transformers' default), the output bias is one tensor under two names and a folder holds the second;
    # untied, both are saved and the decoder's is the one the model adds.
    aliases={"cls.predictions.decoder.bias": "cls.predictions.bias"},
    absent_as_zeros=frozenset({"wtt.weight"}),
    classifier={"score.weight": "classifier.weight", "score.bias": "classifier.bias"},
)


_E, _D = "model.encoder.layers.{i}.", "model.decoder.layers.{j}."
_E_SELF, _D_SELF, _D_CROSS = _E + "self_attn.", _D + "self_attn.", _D + "encoder_attn."
_KK = ("q", "q")  # a cross-attention's [k; v], key/value heads expanded as _QQQ's

# BartForConditionalGeneration; a BartModel (no output head, no "model." prefix). One embedding table for both sides
# and the head. Post-norm: our norm1 follows self-attention, norm_cross cross-attention, norm2 the MLP. BART has no
# grouped-query attention: fewer key/value heads export repeated (kv_expanded).
BART = NameTable(
    names={
        "wte.weight": "model.shared.weight",
        "enc_wpe.weight": "model.encoder.embed_positions.weight",
        "enc_emb_norm.weight": "model.encoder.layernorm_embedding.weight",
        "enc_emb_norm.bias": "model.encoder.layernorm_embedding.bias",
        "encoder_blocks.{i}.attn.qkv.weight": Split((_E_SELF + "q_proj.weight", _E_SELF + "k_proj.weight",
                                                     _E_SELF + "v_proj.weight"), _QQQ),
        "encoder_blocks.{i}.attn.qkv.bias": Split((_E_SELF + "q_proj.bias", _E_SELF + "k_proj.bias",
                                                   _E_SELF + "v_proj.bias"), _QQQ),
        "encoder_blocks.{i}.attn.proj.weight": _E_SELF + "out_proj.weight",
        "encoder_blocks.{i}.attn.proj.bias": _E_SELF + "out_proj.bias",
        "encoder_blocks.{i}.norm1.weight": _E + "self_attn_layer_norm.weight",
        "encoder_blocks.{i}.norm1.bias": _E + "self_attn_layer_norm.bias",
        "encoder_blocks.{i}.mlp.fc.weight": _E + "fc1.weight",
        "encoder_blocks.{i}.mlp.fc.bias": _E + "fc1.bias",
        "encoder_blocks.{i}.mlp.proj.weight": _E + "fc2.weight",
        "encoder_blocks.{i}.mlp.proj.bias": _E + "fc2.bias",
        "encoder_blocks.{i}.norm2.weight": _E + "final_layer_norm.weight",
        "encoder_blocks.{i}.norm2.bias": _E + "final_layer_norm.bias",
        "dec_wpe.weight": "model.decoder.embed_positions.weight",
        "dec_emb_norm.weight": "model.decoder.layernorm_embedding.weight",
        "dec_emb_norm.bias": "model.decoder.layernorm_embedding.bias",
        "decoder_blocks.{j}.attn.qkv.weight": Split((_D_SELF + "q_proj.weight", _D_SELF + "k_proj.weight",
                                                     _D_SELF + "v_proj.weight"), _QQQ),
        "decoder_blocks.{j}.attn.qkv.bias": Split((_D_SELF + "q_proj.bias", _D_SELF + "k_proj.bias",
                                                   _D_SELF + "v_proj.bias"), _QQQ),
        "decoder_blocks.{j}.attn.proj.weight": _D_SELF + "out_proj.weight",
        "decoder_blocks.{j}.attn.proj.bias": _D_SELF + "out_proj.bias",
        "decoder_blocks.{j}.norm1.weight": _D + "self_attn_layer_norm.weight",
        "decoder_blocks.{j}.norm1.bias": _D + "self_attn_layer_norm.bias",
        "decoder_blocks.{j}.cross.q.weight": _D_CROSS + "q_proj.weight",
        "decoder_blocks.{j}.cross.q.bias": _D_CROSS + "q_proj.bias",
        "decoder_blocks.{j}.cross.kv.weight": Split((_D_CROSS + "k_proj.weight", _D_CROSS + "v_proj.weight"), _KK),
        "decoder_blocks.{j}.cross.kv.bias": Split((_D_CROSS + "k_proj.bias", _D_CROSS + "v_proj.bias"), _KK),
        "decoder_blocks.{j}.cross.proj.weight": _D_CROSS + "out_proj.weight",
        "decoder_blocks.{j}.cross.proj.bias": _D_CROSS + "out_proj.bias",
        "decoder_blocks.{j}.norm_cross.weight": _D + "encoder_attn_layer_norm.weight",
        "decoder_blocks.{j}.norm_cross.bias": _D + "encoder_attn_layer_norm.bias",
        "decoder_blocks.{j}.mlp.fc.weight": _D + "fc1.weight",
        "decoder_blocks.{j}.mlp.fc.bias": _D + "fc1.bias",
        "decoder_blocks.{j}.mlp.proj.weight": _D + "fc2.weight",
        "decoder_blocks.{j}.mlp.proj.bias": _D + "fc2.bias",
        "decoder_blocks.{j}.norm2.weight": _D + "final_layer_norm.weight",
        "decoder_blocks.{j}.norm2.bias": _D + "final_layer_norm.bias",
        "lm_head.weight": "lm_head.weight",
        "lm_head.bias": "final_logits_bias",
    },
    kv_expanded=frozenset({"encoder_blocks.{i}.attn.qkv.weight", "encoder_blocks.{i}.attn.qkv.bias",
                           "decoder_blocks.{j}.attn.qkv.weight", "decoder_blocks.{j}.attn.qkv.bias",
                           "decoder_blocks.{j}.cross.kv.weight", "decoder_blocks.{j}.cross.kv.bias"}),
    biases_always=True,
    optional_prefix="model.",
    head_optional=True,
    # A BartModel has no output bias; transformers reads a folder without one as zeros (as ours starts).
    optional=frozenset({"lm_head.bias"}),
    leading_rows={"enc_wpe.weight": 2, "dec_wpe.weight": 2},
    as_row=frozenset({"lm_head.bias"}),
)

_LAYERS = {"{i}": "n_layer", "{j}": "n_decoder_layer"}
"""A name template's layer placeholder -> the ModelConfig property counting those layers."""


def is_gpt2_style(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` maps to GPT-2 (learned positions) rather than Llama (the default: also what a custom mix is
    checked against)."""
    return cfg.standard_family == "gpt2"


def name_table(cfg: ModelConfig) -> NameTable:
    """The name table of ``cfg``'s family (Llama's for a decoder of none)."""
    return {"gpt2": GPT2, "bert": BERT, "bart": BART}.get(cfg.standard_family or "", LLAMA)


def _layer_mark(template: str) -> str | None:
    return next((mark for mark in _LAYERS if mark in template), None)


def _entries(table: NameTable, cfg: ModelConfig) -> Iterator[tuple[str, str, str | Split]]:
    """(template, ours, theirs) for every parameter, in table order, runs of ``{i}`` (``{j}``) templates repeated per
    layer (decoder layer)."""
    items = list(table.names.items())
    j = 0
    while j < len(items):
        mark = _layer_mark(items[j][0])
        if mark is None:
            yield items[j][0], items[j][0], items[j][1]
            j += 1
            continue
        end = j
        while end < len(items) and _layer_mark(items[end][0]) == mark:
            end += 1
        for n in range(getattr(cfg, _LAYERS[mark])):
            for ours, theirs in items[j:end]:
                named = Split(tuple(p.replace(mark, str(n)) for p in theirs.parts), theirs.rows) \
                    if isinstance(theirs, Split) else theirs.replace(mark, str(n))
                yield ours, ours.replace(mark, str(n)), named
        j = end


def _rows(cfg: ModelConfig, split: Split) -> list[int]:
    size = {"q": cfg.n_head * cfg.head_dim, "kv": cfg.kv_heads * cfg.head_dim, "mlp": cfg.mlp_hidden}
    return [size[r] for r in split.rows]


def _weight_of(bias_name: str) -> str:
    return bias_name.removesuffix(".bias") + ".weight"


def _present(ours: str, sd: dict[str, torch.Tensor]) -> bool:
    """Whether the model holds ``ours``, or for a bias the layer it belongs to (a bias-free one's exports zeros)."""
    return ours in sd or (ours.endswith(".bias") and _weight_of(ours) in sd)


def _get(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in sd:
        raise UserError(f"Hugging Face weights lack '{name}' (is the folder complete?)")
    return sd[name]


def _expand_kv(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """qkv rows (or bias) [q; k; v], or a cross-attention's [k; v], with each key/value head repeated
    n_head // kv_heads times."""
    kv = cfg.kv_heads * cfg.head_dim
    wq, wk, wv = t.split([t.shape[0] - 2 * kv, kv, kv])  # no query rows in a cross-attention's kv
    group = cfg.n_head // cfg.kv_heads

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (cfg.kv_heads, cfg.head_dim)).repeat_interleave(group, dim=0).flatten(0, 1)

    return torch.cat([wq, rep(wk), rep(wv)])


def map_to_hf(table: NameTable, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict ``sd`` (of a GPT built from ``cfg``) under the names of ``table``'s family."""
    out: dict[str, torch.Tensor] = {}
    ours_done: dict[str, torch.Tensor] = {}  # after k/v expansion, before transposing
    for template, ours, theirs in _entries(table, cfg):
        if template in table.optional and not _present(ours, sd):
            continue  # a part this model lacks (BERT's pooler; the masked-LM head of a classifier's backbone)
        if ours not in sd and template in table.absent_as_zeros:
            t = torch.zeros(1, cfg.n_embd, dtype=sd["wte.weight"].dtype, device=sd["wte.weight"].device)
        elif ours not in sd and ours.endswith(".bias"):
            if not table.biases_always:
                continue  # a bias-free model exports no biases
            w = ours_done[_weight_of(ours)]
            t = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        else:
            t = sd[ours]
            if template in table.kv_expanded and cfg.kv_heads != cfg.n_head:
                t = _expand_kv(cfg, t)
        ours_done[ours] = t
        if template in table.transposed:
            t = t.t()
        if template in table.leading_rows:
            t = torch.cat([t.new_zeros(table.leading_rows[template], *t.shape[1:]), t])
        if template in table.as_row:
            t = t[None]
        if isinstance(theirs, Split):
            out.update(zip(theirs.parts, t.split(_rows(cfg, theirs)), strict=True))
        else:
            out[theirs] = t
            if theirs in table.aliases:
                out[table.aliases[theirs]] = t
    return {k: v.contiguous() for k, v in out.items()}


def map_from_hf(table: NameTable, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers`` weights ``sd`` under ``table``'s names -> our state dict for a GPT built from ``cfg``.

    Raises UserError naming the first required weight that ``sd`` lacks; the optional parts it lacks are left out.
    """
    def get(name: str) -> torch.Tensor:
        return _get(sd, name)

    drop = table.optional_prefix if table.optional_prefix and table.names["wte.weight"] not in sd else ""

    def theirs_name(name: str) -> str:
        """The name ``sd`` holds ``name`` under: without the optional prefix, or its alias where only that is there."""
        held = name[len(drop):] if drop and name.startswith(drop) else name
        alias = table.aliases.get(name)
        return alias if held not in sd and alias is not None and alias in sd else held

    def bias_or_zeros(name: str) -> torch.Tensor:  # Qwen2: biases on q/k/v only, zeros compute the same
        return sd[name] if name in sd else torch.zeros(get(_weight_of(name)).shape[0])

    out: dict[str, torch.Tensor] = {}
    for template, ours, theirs in _entries(table, cfg):
        is_bias = ours.endswith(".bias")
        if is_bias and not table.biases_always and not cfg.bias:
            continue
        if ours == "lm_head.weight":
            name = theirs_name(theirs)
            out[ours] = sd.get(name, out["wte.weight"]) if table.head_optional or cfg.tie_embeddings else get(name)
            continue
        if template in table.optional and theirs_name(theirs) not in sd:  # only plain names are optional
            continue
        fetch = bias_or_zeros if is_bias and not table.biases_always else get
        if isinstance(theirs, Split):
            t = torch.cat([fetch(theirs_name(p)) for p in theirs.parts])
        else:
            t = fetch(theirs_name(theirs))
        if template in table.as_row:
            t = t.reshape(-1)
        if template in table.leading_rows:
            t = t[table.leading_rows[template]:]
        out[ours] = t.t().contiguous() if template in table.transposed else t
    return out


def hf_config(cfg: ModelConfig, labels: list[str] | None = None) -> PretrainedConfig:
    """The ``transformers`` config of the same architecture (GPT2Config, LlamaConfig, BertConfig or BartConfig);
    ``labels``: the class names of a classifier on the model (BERT's only: a BertForSequenceClassification).

    A BartConfig's special ids (padding, end-of-text, the decoder's start) are the tokenizer's: left None here,
    ``lmforge.interop`` sets them with the generation settings."""
    from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig

    problem = cfg.export_problem()
    if problem:
        raise UserError(f"{problem}, so transformers cannot load it")
    if labels is not None and cfg.standard_family != "bert":
        raise UserError(f"a classifier on a {cfg.family} model has no transformers form here (its transformer "
                        f"exports alone); only one on a BERT encoder has (BertForSequenceClassification)")
    if cfg.standard_family == "bert":
        if labels is not None and not cfg.pooler:
            # BertForSequenceClassification always reads the pooler; without one ours reads [CLS]'s state itself.
            raise UserError("this classifier's encoder has no pooler (model.pooler=false), and transformers' "
                            "BertForSequenceClassification always reads one, so transformers cannot load it")
        head = {} if labels is None else {"id2label": dict(enumerate(labels)),
                                          "label2id": {label: i for i, label in enumerate(labels)}}
        # The token-type table BERT always has; an encoder without one exports a single row of zeros.
        return BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                          num_attention_heads=cfg.n_head, intermediate_size=cfg.mlp_hidden,
                          hidden_act=_GELU[cfg.mlp], hidden_dropout_prob=cfg.dropout,
                          attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.block_size,
                          type_vocab_size=cfg.type_vocab_size or 1, layer_norm_eps=cfg.norm_eps,
                          tie_word_embeddings=cfg.tie_embeddings, pad_token_id=None,
                          architectures=["BertForSequenceClassification" if labels is not None
                                         else "BertForMaskedLM"], **head)
    if cfg.standard_family == "bart":
        if cfg.norm_eps != BART_NORM_EPS:
            raise UserError(f"model.norm_eps={cfg.norm_eps:g}: BART's LayerNorms have eps {BART_NORM_EPS:g}, which no "
                            f"BartConfig key changes, so transformers cannot load it")
        return BartConfig(vocab_size=cfg.vocab_size, d_model=cfg.n_embd, encoder_layers=cfg.n_layer,
                          decoder_layers=cfg.n_decoder_layer, encoder_attention_heads=cfg.n_head,
                          decoder_attention_heads=cfg.n_head, encoder_ffn_dim=cfg.mlp_hidden,
                          decoder_ffn_dim=cfg.mlp_hidden, max_position_embeddings=cfg.block_size,
                          activation_function=_GELU[cfg.mlp], dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, scale_embedding=False, tie_word_embeddings=True,
                          pad_token_id=None, bos_token_id=None, eos_token_id=None, decoder_start_token_id=None,
                          forced_eos_token_id=None, architectures=["BartForConditionalGeneration"])
    if is_gpt2_style(cfg):
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                          activation_function=_GELU[cfg.mlp], layer_norm_epsilon=cfg.norm_eps,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=cfg.block_size,
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                       bos_token_id=None, eos_token_id=None)


def _bert_class(hf: PretrainedConfig) -> str:
    """A BERT config's class (its first ``architectures``; BertForMaskedLM if none), one that imports."""
    arch = (getattr(hf, "architectures", None) or ["BertForMaskedLM"])[0]
    if arch not in BERT_ARCHITECTURES:
        raise UserError(f"BERT architecture '{arch}' is not supported ({', '.join(BERT_ARCHITECTURES)})")
    return arch


def bert_task(hf: PretrainedConfig) -> str:
    """What a BERT config's class imports as: 'mlm' (an Encoder) or 'classify' (a SequenceClassifier on one)."""
    return BERT_ARCHITECTURES[_bert_class(hf)]


def hf_task(hf: PretrainedConfig) -> str:
    """What a ``transformers`` config imports as, a key of :data:`AUTO_CLASSES`: 'lm' (a GPT), 'mlm' (an Encoder),
    'classify' (a SequenceClassifier on one) or 'seq2seq' (an EncoderDecoder)."""
    kind = getattr(hf, "model_type", None)
    return bert_task(hf) if kind == "bert" else "seq2seq" if kind == "bart" else "lm"


def hf_labels(hf: PretrainedConfig) -> list[str] | None:
    """The class names of a sequence classifier's config (its id2label, in id order); None for other models."""
    if getattr(hf, "model_type", None) != "bert" or bert_task(hf) != "classify":
        return None
    problem = getattr(hf, "problem_type", None)
    if problem not in (None, "single_label_classification"):
        raise UserError(f"BERT problem_type '{problem}' is not supported (lmforge classifies: one label per text)")
    names = hf.id2label or {}
    return [str(names.get(i, f"LABEL_{i}")) for i in range(hf.num_labels)]


def config_from_hf(hf: PretrainedConfig, names: Collection[str] | None = None) -> ModelConfig:
    """Our ModelConfig for a ``transformers`` config (GPT-2, Llama, Mistral, Qwen2, BERT, BART).

    names: the folder's weight names, which say what only the weights tell (whether a BERT has a pooler); None:
    what its class has by default (all but BertForMaskedLM).
    """
    kind = getattr(hf, "model_type", None)
    if kind == "bert":
        return _bert_config(hf, names)
    if kind == "bart":
        return _bart_config(hf)
    if kind == "gpt2":
        act = hf.activation_function
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation_function '{act}' is not supported (gelu, gelu_new)")
        if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            raise UserError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported "
                            "(scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True)")
        return ModelConfig(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, intermediate_size=hf.n_inner or 4 * hf.n_embd,
                           pos_embedding="learned", norm="layernorm",
                           mlp="gelu" if act == "gelu" else "gelu_tanh", bias=True,
                           tie_embeddings=getattr(hf, "tie_word_embeddings", True),
                           norm_eps=hf.layer_norm_epsilon, dropout=0.0)
    if kind in ("llama", "mistral", "qwen2"):
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if head_dim * hf.num_attention_heads != hf.hidden_size:
            raise UserError(f"{kind}: head_dim {head_dim} x {hf.num_attention_heads} heads != hidden_size "
                            f"{hf.hidden_size} is not supported")
        act = getattr(hf, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"{kind}: hidden_act '{act}' is not supported (only silu, i.e. SwiGLU)")
        scaling = getattr(hf, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise UserError(f"{kind}: rope_scaling {scaling} is not supported (only unscaled RoPE)")
        theta = getattr(hf, "rope_theta", None) or (getattr(hf, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0)
        # One switch covers every linear layer here: Qwen2's q/k/v-only biases import with zero
        # biases elsewhere (map_from_hf fills them), which computes the same function.
        bias = kind == "qwen2" or bool(getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False))
        # Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full attention
        # on sequences no longer than the window: the context is capped there, which keeps it exact.
        block_size = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        if window and getattr(hf, "use_sliding_window", True):
            block_size = min(block_size, window)
        return ModelConfig(vocab_size=hf.vocab_size, block_size=block_size,
                           n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                           n_kv_head=hf.num_key_value_heads or hf.num_attention_heads, n_embd=hf.hidden_size,
                           intermediate_size=hf.intermediate_size, pos_embedding="rope", norm="rmsnorm",
                           mlp="swiglu", bias=bias, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
                           rope_theta=float(theta), norm_eps=hf.rms_norm_eps, dropout=0.0)
    raise UserError(f"unsupported Hugging Face model_type '{kind}' (supported: {', '.join(SUPPORTED)})")


def _bert_config(hf: PretrainedConfig, names: Collection[str] | None) -> ModelConfig:
    """Our encoder's ModelConfig for a BertConfig (see :func:`config_from_hf`)."""
    arch = _bert_class(hf)
    position = getattr(hf, "position_embedding_type", None) or "absolute"
    if position != "absolute":
        raise UserError(f"BERT position_embedding_type '{position}' is not supported (only absolute)")
    if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
        raise UserError("BERT as a decoder (is_decoder or add_cross_attention) is not supported (only the encoder)")
    act = hf.hidden_act
    if act not in _GELU_FROM_HF:
        raise UserError(f"BERT hidden_act '{act}' is not supported ({', '.join(_GELU_FROM_HF)})")
    if names is None:  # the class's default: each but BertForMaskedLM has a pooler
        pooler = arch != "BertForMaskedLM"
    else:
        pooler = any(n in names for n in (BERT.names["pooler.weight"], "pooler.dense.weight"))
    return ModelConfig(arch="encoder", vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings,
                       n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_embd=hf.hidden_size,
                       intermediate_size=hf.intermediate_size, pos_embedding="learned", norm="layernorm",
                       mlp=_GELU_FROM_HF[act], bias=True, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
                       norm_eps=hf.layer_norm_eps, dropout=0.0, post_norm=True, type_vocab_size=hf.type_vocab_size,
                       pooler=pooler)


def _bart_config(hf: PretrainedConfig) -> ModelConfig:
    """Our encoder-decoder's ModelConfig for a BartConfig (see :func:`config_from_hf`)."""
    arch = (getattr(hf, "architectures", None) or [BART_ARCHITECTURES[0]])[0]
    if arch not in BART_ARCHITECTURES:
        raise UserError(f"BART architecture '{arch}' is not supported ({', '.join(BART_ARCHITECTURES)})")
    # Keys of BART's relatives (mBART, older configs) that change what it computes; ours is BART itself.
    unlike = {"scale_embedding": "token embeddings unscaled", "add_bias_logits": "no bias inside the output head",
              "normalize_before": "post-norm blocks", "add_final_layer_norm": "no final norm (post-norm)"}
    for key, ours in unlike.items():
        if getattr(hf, key, False):
            raise UserError(f"BART {key}=true is not supported (lmforge's BART has {ours}: {key}=false)")
    if not getattr(hf, "tie_word_embeddings", True):
        raise UserError("BART tie_word_embeddings=false is not supported (lmforge's encoder-decoder shares one "
                        "embedding between encoder, decoder and output head: tie_word_embeddings=true)")
    for what, ours in (("attention_heads", "model.n_head"), ("ffn_dim", "model.intermediate_size")):
        enc, dec = getattr(hf, f"encoder_{what}"), getattr(hf, f"decoder_{what}")
        if enc != dec:
            raise UserError(f"BART encoder_{what}={enc} and decoder_{what}={dec} differ (lmforge has one {ours} "
                            f"for both sides)")
    act = hf.activation_function
    if act not in _GELU_FROM_HF:
        raise UserError(f"BART activation_function '{act}' is not supported ({', '.join(_GELU_FROM_HF)})")
    return ModelConfig(arch="encoder_decoder", vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings,
                       n_layer=hf.encoder_layers, decoder_layers=0 if hf.decoder_layers == hf.encoder_layers
                       else hf.decoder_layers, n_head=hf.encoder_attention_heads, n_embd=hf.d_model,
                       intermediate_size=hf.encoder_ffn_dim, pos_embedding="learned", norm="layernorm",
                       mlp=_GELU_FROM_HF[act], bias=True, tie_embeddings=True, norm_eps=BART_NORM_EPS, dropout=0.0,
                       post_norm=True)


Backbone = GPT | Encoder | EncoderDecoder
"""A model without a task head, which maps to one ``transformers`` family."""


def _parts(model: Backbone | SequenceClassifier) -> tuple[Backbone, NameTable, torch.nn.Linear | None]:
    """(backbone, its name table, a classifier's head or None)."""
    head = model.score if isinstance(model, SequenceClassifier) else None
    backbone = model.backbone if isinstance(model, SequenceClassifier) else model
    table = name_table(backbone.cfg)
    if head is not None and not table.classifier:
        raise UserError(f"a classifier on a {backbone.cfg.family} model has no transformers form here; only one on a "
                        f"BERT encoder has (BertForSequenceClassification)")
    return backbone, table, head


def to_hf_state_dict(model: Backbone | SequenceClassifier) -> dict[str, torch.Tensor]:
    """Our weights under ``transformers`` names (GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM,
    BartForConditionalGeneration, or a classifier on a BERT encoder's: BertForSequenceClassification, which also gets
    the masked-LM head's, to leave out)."""
    backbone, table, head = _parts(model)
    sd = {k: v.detach() for k, v in backbone.state_dict().items()}
    out = map_to_hf(table, backbone.cfg, sd)
    if head is not None:
        out.update({theirs: getattr(head, ours.removeprefix("score.")).detach().contiguous()
                    for ours, theirs in table.classifier.items()})
    return out


def from_hf_state_dict(model: Backbone | SequenceClassifier, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers`` weights -> a whole state dict for ``model`` (built from the folder's config): the optional
    parts the weights lack (a BertModel's masked-LM head, a BartModel's output bias) keep the model's own values."""
    backbone, table, head = _parts(model)
    mapped = map_from_hf(table, backbone.cfg, sd)
    if head is not None:
        mapped = {f"backbone.{k}": v for k, v in mapped.items()}
        mapped.update({ours: _get(sd, theirs) for ours, theirs in table.classifier.items()})
    return {**model.state_dict(), **mapped}


def new_model(cfg: ModelConfig, labels: list[str] | None = None) -> Backbone | SequenceClassifier:
    """A freshly initialized model of ``cfg``, under a classifier head of ``labels`` if given: what weights from
    ``transformers`` are loaded into."""
    backbone = build_model(cfg)
    return backbone if labels is None else SequenceClassifier(backbone, len(labels))


def to_hf_model(model: Backbone | SequenceClassifier, labels: list[str] | None = None) -> PreTrainedModel:
    """An eval-mode ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` / ``BertForMaskedLM`` / ``BartForConditionalGeneration``
    holding a copy of our weights, on our model's device and in its dtype; a classifier on a BERT encoder becomes a
    ``BertForSequenceClassification`` of ``labels`` (default LABEL_0, LABEL_1, ...). A BART's special ids and
    generation settings are the tokenizer's: ``lmforge.interop.set_seq2seq_generation`` sets them."""
    import transformers

    head = model.score if isinstance(model, SequenceClassifier) else None
    backbone = model.backbone if isinstance(model, SequenceClassifier) else model
    if head is not None:
        labels = labels if labels is not None else [f"LABEL_{i}" for i in range(head.out_features)]
        if len(labels) != head.out_features:
            raise ValueError(f"{len(labels)} labels for a classifier of {head.out_features} classes")
    config = hf_config(backbone.cfg, labels if head is not None else None)  # what transformers cannot load, first
    task = "classify" if head is not None else rundir.backbone_task(backbone.cfg.arch)
    hf = getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    sd = to_hf_state_dict(model)
    table = name_table(backbone.cfg)
    # The parts the class lacks are left out: BertForMaskedLM has no pooler, a sequence classifier no masked-LM head.
    wanted = hf.state_dict().keys()
    optional = {name for o in table.optional for name in (table.names[o], table.aliases.get(table.names[o]))}
    unexpected = [k for k in sd if k not in wanted and k not in optional]
    missing, _ = hf.load_state_dict({k: v for k, v in sd.items() if k in wanted}, strict=False)
    # A tied name (BART's encoder and decoder embed_tokens: its shared table) is the same tensor as one loaded.
    tied = wanted - dict(hf.named_parameters()).keys() - dict(hf.named_buffers()).keys()
    missing = [k for k in missing if k not in tied and not k.endswith("attn.bias") and "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    if backbone.cfg.tie_embeddings:
        hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def from_hf_model(hf: PreTrainedModel) -> Backbone | SequenceClassifier:
    """Our model holding a copy of a ``transformers`` model's weights (fp32, eval mode): a GPT for a causal LM, an
    Encoder for a BERT, a SequenceClassifier on one for a BertForSequenceClassification, an EncoderDecoder for a
    BartForConditionalGeneration (or BartModel)."""
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    model = new_model(config_from_hf(hf.config, sd.keys()), hf_labels(hf.config))
    model.load_state_dict(from_hf_state_dict(model, sd))
    return model.eval()
