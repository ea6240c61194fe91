"""GGUF export: an lmforge model and its tokenizer as one file that llama.cpp (and Ollama, LM Studio, ...) runs.

Architectures. A GGUF file names an architecture and llama.cpp builds that architecture's graph, so a model is
written only where one computes the same function:

* GPT-2 style (learned positions, LayerNorm, GELU) -> ``gpt2``: fused ``attn_qkv`` (our [q; k; v] rows as they
  are; fewer key/value heads are expressed with ``head_count_kv``), biases everywhere (llama.cpp requires them:
  a bias-free model gets zeros, which compute the same), ``position_embd``. llama.cpp's gpt2 graph applies
  ``ggml_gelu``, the tanh approximation: a model trained with ``mlp=gelu_tanh`` runs exactly, one with the exact
  GELU (``mlp=gelu``, the default) runs with the approximation: |gelu(x) - gelu_tanh(x)| <= 4.8e-4, largest at
  |x| = 2.7, where half an fp16 step (the rounding llama.cpp applies to activations anyway) is 9.8e-4.
* Llama style (RoPE, RMSNorm, SwiGLU) -> ``llama``: ``attn_q``/``attn_k``/``attn_v`` and ``ffn_gate``/``ffn_up``
  split from our fused ``qkv`` and ``fc``; biases (``model.bias``) as the optional ``.bias`` tensors llama.cpp's
  llama graph reads.
* Refused (``ModelConfig.export_problem`` names what is missing, and a preset that has it): qk_norm,
  logit_softcap, relu2, and the mixed shapes (RoPE with LayerNorm, learned positions with SwiGLU, ...), which
  neither graph computes.

An untied output head is ``output.weight``; a tied one is left out, because both graphs fall back to
``token_embd.weight`` when ``output.weight`` is absent (llama-model.cpp: TENSOR_NOT_REQUIRED, then the
embedding, TENSOR_DUPLICATED).

RoPE. Our RoPE rotates the pairs (x[j], x[j + d/2]) of each head ("rotate half", as Hugging Face's Llama);
llama.cpp's llama architecture rotates (x[2j], x[2j + 1]), with the same frequency for pair j. So the rows of
every head of the query and key projections (and their biases) are reordered, row j -> 2j and row j + d/2 ->
2j + 1: the permutation convert_hf_to_gguf.py applies to Hugging Face Llama weights. Queries and keys then
carry the same values in another order, and their dot products, all attention sees, are unchanged.

Types (``qtype``), following llama.cpp's converter (convert_hf_to_gguf.py, ``prepare_tensors``):

* 1-D tensors (norm gains, biases) and the learned position table are F32, whatever the type;
* ``f16``: every other (2-D) matrix is F16;
* ``q8_0``: every other matrix whose rows are whole blocks of 32 is Q8_0, the rest F16 (the MLP's down
  projection, whose rows are the intermediate size, e.g. after structured pruning); a width (``n_embd``) that is
  no multiple of 32 is refused, since then almost no matrix could be quantized;
* ``q4_0``: the same with Q4_0, except the output head (``output.weight``, or ``token_embd.weight`` when tied,
  as it is the head too), which is Q8_0: llama.cpp's quantizer gives the head more bits than the rest (Q6_K,
  which gguf-py cannot write; Q8_0 is its own fallback where Q6_K does not fit).

Tokenizer: byte-level BPE as ``tokenizer.ggml.model = gpt2`` with the GPT-2 pre-tokenizer regex
(``tokenizer.ggml.pre = gpt-2``), tokens in id order, token types (special tokens CONTROL, other added tokens
USER_DEFINED, ids the tokenizer lacks ``[PADi]`` UNUSED: the embedding may have more rows than the tokenizer
has tokens), merges, the end-of-text token as BOS and EOS (GPT-2's convention; neither added automatically)
and as end-of-turn, unless a chat template's own turn-end token is given. A character-level vocabulary is
refused: llama.cpp's BPE would split text into the UTF-8 bytes of characters the vocabulary does not have,
where lmforge maps any unseen character to end-of-text.

:func:`read_gguf` reads a file written here back into lmforge's own names and layout.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.interop import temporary_sibling
from lmforge.model.gpt import GPT
from lmforge.rundir import fsync_path, storage_errors

QTYPES = ("f16", "q8_0", "q4_0")
"""The ``qtype`` values :func:`export_gguf` writes."""
PRE_TOKENIZER = "gpt-2"
"""llama.cpp's name for the GPT-2 pre-tokenizer regex, which byte-level BPE's ByteLevel(use_regex) applies."""


# --------------------------------------------------------------------------------------------------
# Names: ours <-> GGUF's, as data


@dataclass(frozen=True)
class _Part:
    """One GGUF tensor cut from the rows of one of ours (``{i}``: layer index).

    rows: "all", or the share of our fused tensor's rows ("q": query heads x head_dim, "kv": key/value heads x
    head_dim, "mlp": the MLP's hidden size), in order. rope: the head count ("q" or "kv") whose rows get
    llama.cpp's RoPE order, or None.
    """

    name: str
    rows: str = "all"
    rope: str | None = None


_GPT2_NAMES: dict[str, tuple[_Part, ...]] = {  # ours without .weight/.bias -> GGUF's
    "wte": (_Part("token_embd"),),
    "wpe": (_Part("position_embd"),),
    "blocks.{i}.norm1": (_Part("blk.{i}.attn_norm"),),
    "blocks.{i}.attn.qkv": (_Part("blk.{i}.attn_qkv"),),
    "blocks.{i}.attn.proj": (_Part("blk.{i}.attn_output"),),
    "blocks.{i}.norm2": (_Part("blk.{i}.ffn_norm"),),
    "blocks.{i}.mlp.fc": (_Part("blk.{i}.ffn_up"),),
    "blocks.{i}.mlp.proj": (_Part("blk.{i}.ffn_down"),),
    "norm_f": (_Part("output_norm"),),
    "lm_head": (_Part("output"),),
}

_LLAMA_NAMES: dict[str, tuple[_Part, ...]] = {
    "wte": (_Part("token_embd"),),
    "blocks.{i}.norm1": (_Part("blk.{i}.attn_norm"),),
    "blocks.{i}.attn.qkv": (_Part("blk.{i}.attn_q", "q", "q"), _Part("blk.{i}.attn_k", "kv", "kv"),
                            _Part("blk.{i}.attn_v", "kv")),
    "blocks.{i}.attn.proj": (_Part("blk.{i}.attn_output"),),
    "blocks.{i}.norm2": (_Part("blk.{i}.ffn_norm"),),
    "blocks.{i}.mlp.fc": (_Part("blk.{i}.ffn_gate", "mlp"), _Part("blk.{i}.ffn_up", "mlp")),
    "blocks.{i}.mlp.proj": (_Part("blk.{i}.ffn_down"),),
    "norm_f": (_Part("output_norm"),),
    "lm_head": (_Part("output"),),
}

_NAMES = {"gpt2": _GPT2_NAMES, "llama": _LLAMA_NAMES}
_NO_BIAS = frozenset({"wte", "wpe", "lm_head"})
"""Ours that are weights alone in both files (every other one may have a bias)."""


@dataclass(frozen=True)
class _Shape:
    """What splitting and permuting rows needs, from a ModelConfig or from a file's metadata."""

    n_layer: int
    n_head: int
    n_kv: int
    head_dim: int
    hidden: int

    def rows(self, kind: str) -> int:
        return {"q": self.n_head * self.head_dim, "kv": self.n_kv * self.head_dim, "mlp": self.hidden}[kind]

    def heads(self, kind: str) -> int:
        return {"q": self.n_head, "kv": self.n_kv}[kind]


def _entries(arch: str, n_layer: int) -> list[tuple[str, tuple[_Part, ...]]]:
    """(our name, its GGUF parts) for every tensor of ``arch``, ``.weight`` and ``.bias``, layers expanded."""
    out = []
    for ours, parts in _NAMES[arch].items():
        for i in range(n_layer) if "{i}" in ours else [None]:
            for suffix in (".weight",) if ours in _NO_BIAS else (".weight", ".bias"):
                named = tuple(_Part(p.name.format(i=i) + suffix, p.rows, p.rope) for p in parts)
                out.append((ours.format(i=i) + suffix, named))
    return out


def _to_rope_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from our RoPE order (j pairs with j + d/2) to llama.cpp's (2j pairs with 2j + 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _from_rope_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`_to_rope_order`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_gguf(arch: str, cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our float32 state dict -> GGUF tensor name -> float32 array, in llama.cpp's layout; UserError for a
    tensor it has no name for."""
    entries = _entries(arch, cfg.n_layer)
    unknown = sorted(set(sd) - {ours for ours, _ in entries})
    if unknown:  # e.g. an lmforge-quantized model's qweight/scales: not a layout GGUF's types share
        raise UserError(f"model tensor '{unknown[0]}' ({len(unknown)} in all) has no GGUF name: GGUF export takes a "
                        f"plain lmforge GPT (for a quantized run, export its source with --type q8_0 or q4_0)")
    shape = _Shape(cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden)
    out: dict[str, np.ndarray] = {}
    for ours, parts in entries:
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp takes the embedding when output.weight is absent
        if ours in sd:
            t = sd[ours]
        elif arch == "gpt2" and ours.endswith(".bias"):
            # llama.cpp's gpt2 requires every bias; zeros compute what a bias-free layer does.
            t = np.zeros(sd[ours.removesuffix(".bias") + ".weight"].shape[0], dtype=np.float32)
        else:
            continue
        pieces = [t] if len(parts) == 1 else np.split(t, np.cumsum([shape.rows(p.rows) for p in parts])[:-1])
        for part, piece in zip(parts, pieces, strict=True):
            out[part.name] = _to_rope_order(piece, shape.heads(part.rope)) if part.rope else piece
    return out


def _from_gguf(arch: str, shape: _Shape, tensors: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """GGUF tensors (float32) -> our state-dict names and layout; a missing output head is the embedding.
    UserError naming ``path`` for a tensor split from ours whose shape is not the share the metadata says."""
    out: dict[str, np.ndarray] = {}
    for ours, parts in _entries(arch, shape.n_layer):
        if not all(p.name in tensors for p in parts):
            continue
        for p in parts:
            t, first = tensors[p.name], tensors[parts[0].name]
            expected = (shape.rows(p.rows), *first.shape[1:]) if p.rows != "all" else t.shape
            if t.shape != expected:
                raise UserError(f"'{path}': tensor '{p.name}' has shape {t.shape}, expected {expected} (its share of "
                                f"the rows the file's metadata gives)")
        pieces = [_from_rope_order(tensors[p.name], shape.heads(p.rope)) if p.rope else tensors[p.name]
                  for p in parts]
        out[ours] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if "lm_head.weight" not in out and "wte.weight" in out:
        out["lm_head.weight"] = out["wte.weight"]
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer for an embedding of ``vocab_size`` rows;
    UserError naming what GGUF's BPE cannot describe."""
    where = f"tokenizer '{tokenizer.source}'"
    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{where} is a {model.get('type')} vocabulary, not byte-level BPE, the one GGUF export "
                        f"writes (a character-level tokenizer is WordLevel: train with data.tokenizer=bpe)")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise UserError(f"{where} has pre-tokenizer {json.dumps(pre)}: GGUF export needs GPT-2's "
                        f"(ByteLevel with its regex, no prefix space)")
    extras = [key for key, value in (("normalizer", spec.get("normalizer")), ("byte_fallback", model.get(
        "byte_fallback")), ("continuing_subword_prefix", model.get("continuing_subword_prefix")),
        ("end_of_word_suffix", model.get("end_of_word_suffix")), ("ignore_merges", model.get("ignore_merges")),
        ("dropout", model.get("dropout"))) if value]
    if extras:
        raise UserError(f"{where} sets {', '.join(extras)}: GGUF's GPT-2 BPE has no such option")
    # tokenizers writes merges as "a b" strings up to 0.19 and as [a, b] pairs since 0.20.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise UserError(f"{where} has no merges: GGUF's BPE needs at least one (a vocabulary over 257 tokens)")
    tokenizer.check_fits(vocab_size)
    by_id = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    added = {a["id"]: a.get("special", False) for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows the tokenizer never produces (a padded embedding, gaps in the ids)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types], merges


# --------------------------------------------------------------------------------------------------
# Writing


def _ggml_type(name: str, array: np.ndarray, qtype: str, head: str) -> GGMLQuantizationType:
    """The type llama.cpp's converter would give tensor ``name`` (module docstring, Types)."""
    if array.ndim == 1 or name == "position_embd.weight":
        return GGMLQuantizationType.F32
    if qtype == "f16":
        return GGMLQuantizationType.F16
    target = GGMLQuantizationType.Q8_0 if qtype == "q8_0" or name == head else GGMLQuantizationType.Q4_0
    return target if array.shape[-1] % GGML_QUANT_SIZES[target][0] == 0 else GGMLQuantizationType.F16


def export_gguf(model: GPT, tokenizer: Tokenizer, out: str | Path, qtype: str = "f16", *, name: str = "lmforge",
                chat_template: str | None = None, turn_end: str | None = None) -> Path:
    """Write the model as a GGUF file; returns the path.

    qtype: "f16", "q8_0" or "q4_0" (which tensor gets which type: module docstring). chat_template: a Jinja
    chat template, stored as ``tokenizer.chat_template``; turn_end: the token that ends an answer under it,
    stored as the end-of-turn id where the vocabulary has it (llama.cpp stops generating there), else the
    end-of-text token is. UserError with one line, and no file written, for: an architecture GGUF cannot
    express (an encoder or encoder-decoder; ``ModelConfig.export_problem``), an unknown qtype or one the width
    cannot use, an existing ``out`` (never overwritten), a tokenizer GGUF cannot describe (not byte-level BPE).
    The file appears whole or not at all: it is written next to ``out`` under a temporary name and renamed.
    """
    cfg = model.cfg
    if cfg.arch != "decoder":  # BERT and BART are standard shapes too, of architectures this writer has no graph for
        raise UserError(f"model.arch={cfg.arch}: GGUF files hold decoders for llama.cpp (model.arch=decoder); export "
                        f"it as a Hugging Face folder")
    problem = cfg.export_problem()
    if problem:
        raise UserError(f"{problem}, so llama.cpp cannot run it")
    if qtype not in QTYPES:
        raise UserError(f"GGUF type '{qtype}' is not supported (expected one of: {', '.join(QTYPES)})")
    block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]  # Q4_0's too
    if qtype != "f16" and cfg.n_embd % block:
        raise UserError(f"GGUF type '{qtype}' stores rows in blocks of {block} values and model.n_embd={cfg.n_embd} "
                        f"is no multiple of {block}, so almost no matrix of this model could be {qtype}; export "
                        f"as f16, or train a width divisible by {block} (every preset's is)")
    out = Path(out)
    if out.exists():
        raise UserError(f"--out '{out}' already exists (nothing was overwritten)")
    if not out.parent.is_dir():
        raise UserError(f"--out '{out}': folder '{out.parent}' does not exist")
    tokens, token_types, merges = _vocab(tokenizer, cfg.vocab_size)
    arch = cfg.standard_family
    assert arch is not None  # export_problem said so
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tensors = _to_gguf(arch, cfg, sd)
    head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]

    tmp = temporary_sibling(out)
    w = gguf.GGUFWriter(tmp, arch)  # opens no file before write_header_to_file
    try:
        with storage_errors(out, "writing GGUF"):
            _add_hparams(w, arch, cfg, name, ftype)
            _add_tokenizer(w, tokenizer, tokens, token_types, merges, chat_template, turn_end)
            for tensor_name, array in tensors.items():
                ggml_type = _ggml_type(tensor_name, array, qtype, head)
                w.add_tensor(tensor_name, gguf.quants.quantize(array, ggml_type), raw_dtype=ggml_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            fsync_path(tmp)
            if out.exists():  # appeared while we wrote: still never overwritten
                raise UserError(f"--out '{out}' already exists (nothing was overwritten)")
            os.replace(tmp, out)
    finally:
        w.close()  # a no-op once closed
        tmp.unlink(missing_ok=True)
    return out


def _add_hparams(w: gguf.GGUFWriter, arch: str, cfg: ModelConfig, name: str, ftype: gguf.LlamaFileType) -> None:
    """general.* and the architecture's keys: the ones llama.cpp's loader reads for ``arch``."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, tokens: list[str], token_types: list[int],
                   merges: list[str], chat_template: str | None, turn_end: str | None) -> None:
    """The tokenizer.* keys of a GPT-2 style byte-level BPE vocabulary."""
    eot = tokenizer.eot_id
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    # GPT-2's convention: end-of-text begins and ends documents. llama.cpp defaults BOS/EOS to id 11 when
    # the keys are missing, so they are always written.
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    turn_end_id = tokenizer.token_to_id(turn_end) if turn_end else None
    w.add_uint32(gguf.Keys.Tokenizer.EOT_ID, eot if turn_end_id is None else turn_end_id)
    # lmforge encodes prompts without adding tokens; llama.cpp does what these say.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


# --------------------------------------------------------------------------------------------------
# Reading


READ_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0,
              GGMLQuantizationType.Q4_0)
"""The tensor types :func:`read_gguf` reads: those :func:`export_gguf` writes."""
_SCALAR_BYTES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
                 gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
                 gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
                 gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}
_MAX_NESTING = 8
"""Arrays of arrays deeper than this are refused (real files nest at most once; each level is a recursion)."""
_MAX_DIMS = 4
"""GGML_MAX_DIMS: the most dimensions a GGUF tensor has."""


class _Layout:
    """A walk over a GGUF file's header (key/value pairs, tensor infos) and its tensors' extents, every read and
    every count checked against the bytes the file has, before ``gguf.GGUFReader`` (which checks none: a count
    past the end is an IndexError there, a huge one an endless loop) is given the file."""

    def __init__(self, path: Path, data: bytes | mmap.mmap):
        self.path, self.data, self.pos, self.order = path, data, 0, "<"

    def fail(self, at: int, expected: str, found: object) -> UserError:
        return UserError(f"'{self.path}' is not a valid GGUF file: at byte {at:,} expected {expected}, found {found}")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(self.pos, f"{what} ({n:,} bytes)", f"the end of the file ({len(self.data):,} bytes)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little" if self.order == "<" else "big")

    def count(self, what: str, item_bytes: int) -> int:
        """A count of items of at least ``item_bytes`` each: refused unless that many fit in the bytes left."""
        at, n = self.pos, self.uint(8, what)
        if n * item_bytes > len(self.data) - self.pos:
            raise self.fail(at, f"a {what} whose items (at least {item_bytes} bytes each) fit in the "
                                f"{len(self.data) - self.pos:,} bytes left", f"{n:,}")
        return n

    def string(self, what: str) -> str:
        """A length-prefixed string, for messages (GGUFReader refuses one that is not UTF-8)."""
        return bytes(self.take(self.count(f"length of {what}", 1), what)).decode("utf-8", "replace")

    def value(self, raw_type: int, type_at: int, what: str, depth: int = 0) -> int | None:
        """Skip one value of ``raw_type`` (read at ``type_at``); returns it when it is an unsigned 32-bit integer
        (general.alignment)."""
        if raw_type == gguf.GGUFValueType.STRING:
            self.string(what)
        elif raw_type == gguf.GGUFValueType.UINT32:
            return self.uint(4, what)
        elif raw_type in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[raw_type], what)
        elif raw_type == gguf.GGUFValueType.ARRAY and depth < _MAX_NESTING:
            item_at, item_type = self.pos, self.uint(4, f"the item type of {what}")
            if item_type in _SCALAR_BYTES:
                self.take(self.count(f"length of {what}", _SCALAR_BYTES[item_type]) * _SCALAR_BYTES[item_type], what)
            else:
                for _ in range(self.count(f"length of {what}", 8 if item_type == gguf.GGUFValueType.STRING else 12)):
                    self.value(item_type, item_at, f"an item of {what}", depth + 1)
        else:
            raise self.fail(type_at, f"a GGUF value type for {what} (0 to 12, arrays nested at most {_MAX_NESTING} "
                                f"deep)", raw_type)
        return None

    def check(self) -> None:
        """UserError naming the offset and what was expected at the first thing the file cannot hold."""
        magic = self.take(4, "the magic 'GGUF'")
        if magic != b"GGUF":
            raise self.fail(0, "the magic 'GGUF'", repr(bytes(magic)))
        version = self.uint(4, "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader decides)
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise self.fail(4, "GGUF version 2 or 3", version)
        n_tensors = self.count("tensor_count", 8 + 4 + 4 + 8)  # name length, dims, type, offset
        n_kv = self.count("kv_count", 8 + 4 + 1)  # key length, type, the smallest value
        alignment, keys = gguf.GGUF_DEFAULT_ALIGNMENT, set()
        for _ in range(n_kv):
            at, key = self.pos, self.string("a metadata key")
            if key in keys:
                raise self.fail(at, "a metadata key not seen before", f"a second {key!r}")
            keys.add(key)
            type_at = self.pos
            value = self.value(self.uint(4, f"the value type of {key!r}"), type_at, f"the value of {key!r}")
            if key == "general.alignment" and value is not None:
                alignment = value
        extents = []
        for _ in range(n_tensors):
            name = self.string("a tensor name")
            at, n_dims = self.pos, self.uint(4, f"the dimension count of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise self.fail(at, f"at most {_MAX_DIMS} dimensions of tensor {name!r}", f"{n_dims:,}")
            dims = [self.uint(8, f"a dimension of tensor {name!r}") for _ in range(n_dims)]
            at, raw_type = self.pos, self.uint(4, f"the type of tensor {name!r}")
            if raw_type not in {int(t) for t in READ_TYPES}:
                raise self.fail(at, f"a tensor type lmforge writes ({', '.join(t.name for t in READ_TYPES)}) for "
                                    f"tensor {name!r}", raw_type)
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
            if dims and dims[0] % block:
                raise self.fail(at, f"rows of whole {block}-value blocks in tensor {name!r}", f"{dims[0]:,} values")
            extents.append((name, self.uint(8, f"the data offset of tensor {name!r}"),
                            int(np.prod(dims, dtype=object)) // block * type_bytes))
        if alignment == 0 or alignment & (alignment - 1):
            raise self.fail(self.pos, "a general.alignment that is a power of two", alignment)
        start = -(-self.pos // alignment) * alignment
        for name, offset, n_bytes in extents:
            if start + offset + n_bytes > len(self.data):
                raise self.fail(start + offset, f"the {n_bytes:,} bytes of tensor {name!r}",
                                f"the end of the file ({len(self.data):,} bytes)")


def read_gguf(path: str | Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """(metadata key -> value, tensor name -> float32 array) of a GGUF file written by :func:`export_gguf`.

    The tensors come dequantized in lmforge's own layout: our parameter names (``wte.weight``,
    ``blocks.0.attn.qkv.weight``, ...), q/k/v and gate/up fused again, query and key rows back in our RoPE
    order, so that ``GPT(cfg).load_state_dict`` takes them; ``lm_head.weight`` is the embedding when the file
    has no ``output.weight`` (a tied head), and a GPT-2 file's biases are all there (zeros where the model had
    none). Metadata values are Python values (arrays as lists). UserError (one line naming the file and, for a
    damaged one, the byte offset and what was expected there) for a file that is not GGUF, is cut short or
    damaged, is not of the gpt2 or llama architecture, or lacks the hyper-parameters they need.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"GGUF file '{p}' does not exist")
    try:
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise UserError(f"'{p}' is not a valid GGUF file: it is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _Layout(p, data).check()
        reader = gguf.GGUFReader(p)
        # GGUF.version etc. are the reader's view of the header, not key/value pairs of the file.
        meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    except (ValueError, OSError) as e:  # a UnicodeDecodeError (a key or string of no UTF-8) is a ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"'{p}' is not a valid GGUF file: {first}") from None
    arch = meta.get("general.architecture")
    if arch not in _NAMES:
        raise UserError(f"'{p}' is a GGUF file of architecture '{arch}'; read_gguf reads lmforge's own exports "
                        f"({', '.join(_NAMES)})")

    def hparam(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if type(value) is not int or value <= 0:
            raise UserError(f"'{p}': metadata '{arch}.{key}' is {value!r}, expected a positive integer")
        return value

    n_embd, n_head = hparam("embedding_length"), hparam("attention.head_count")
    shape = _Shape(n_layer=hparam("block_count"), n_head=n_head, n_kv=hparam("attention.head_count_kv", n_head),
                   head_dim=n_embd // n_head, hidden=hparam("feed_forward_length"))
    if n_embd % n_head or n_head % shape.n_kv or (arch == "llama" and shape.head_dim % 2):
        raise UserError(f"'{p}': metadata {arch}.embedding_length={n_embd}, attention.head_count={n_head}, "
                        f"attention.head_count_kv={shape.n_kv}: expected heads of a whole width (even, for RoPE), "
                        f"as many per key/value head")
    raw = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
           for t in reader.tensors}
    return meta, _from_gguf(arch, shape, raw, p)
