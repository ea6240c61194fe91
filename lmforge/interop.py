"""Hugging Face `transformers` interop on disk: model folders in ``save_pretrained`` format, in and out.

This module keeps only the folders: reading one (local or a hub id) into our model (a GPT, a BERT
Encoder, a SequenceClassifier on one, or a BART EncoderDecoder) and tokenizer (``load_hf``), writing
it as an lmforge run directory (``import_hf``), and writing our model and tokenizer as a folder
``transformers`` loads (``export_hf``; an encoder's with BERT's tokenizer files, an encoder-decoder's
with our seq2seq framing and BART's generation settings: ``set_seq2seq_generation``). The in-memory
mapping, configs both ways and the parameter-name tables per family, lives in ``lmforge.model.hf``.

A model folder is data, never code: ``refuse_custom_code`` turns away, before ``transformers`` sees
it, a folder that asks to run its own Python (``auto_map``) or is of a model type we do not map;
every ``transformers`` call passes ``trust_remote_code=False``, and weights are read only from
safetensors (a pickle, ``pytorch_model.bin`` and the like, can run code when loaded).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import models, processors

from lmforge import rundir
from lmforge.chat import ChatTemplate, find_chat_template
from lmforge.config import ModelConfig, TrainConfig, save_yaml
from lmforge.data.seq2seq import Seq2SeqTokens
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.classifier import SequenceClassifier
from lmforge.model.hf import (
    AUTO_CLASSES,
    SUPPORTED,
    Backbone,
    config_from_hf,
    from_hf_model,
    from_hf_state_dict,
    hf_labels,
    hf_task,
    new_model,
    to_hf_model,
)
from lmforge.options import ImportOptions
from lmforge.training.checkpoint import mismatch_detail, save_weights_only

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

HF_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CODE_KEY = "auto_map"
"""The key with which a folder's config.json or tokenizer_config.json names its own Python classes."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that are pickles (torch.save): never read, loading one can run arbitrary code."""
HUB_TIMEOUT_S = 5.0
"""How long a hub id's first question to the Hugging Face hub waits for an answer before it counts as unreachable."""


def check_new_folder(out: Path) -> None:
    """UserError unless ``out`` can become a new folder: absent, or an empty folder (never overwrite)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file (expected a folder to create)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty (nothing was overwritten)")


def temporary_sibling(out: Path) -> Path:
    """Where a command builds ``out`` (a folder or a file) before renaming it into place, so that ``out`` appears
    whole or not at all: ``.NAME.tmpPID`` beside it, not there yet. The ones killed runs left are removed first
    (:func:`remove_stale_temporaries`); one of this PID can only be an earlier process's that had it."""
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    _remove(tmp)
    return tmp


def remove_stale_temporaries(out: Path) -> None:
    """Remove the ``.NAME.tmpPID`` files and folders beside ``out`` whose process no longer exists: what a killed
    export, quantize or prune of the same output left (a running one's are left alone)."""
    prefix = f".{out.name}.tmp"
    for path in out.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and not rundir.process_exists(int(pid)):
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_hf_folder(path: str | Path) -> bool:
    """A ``save_pretrained`` folder: it has transformers' config.json and is no lmforge run directory."""
    p = Path(path)
    return (p / HF_CONFIG).is_file() and not rundir.is_run_dir(p)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}': cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a JSON object")
    return data


def _code_files(auto_map: object) -> list[str]:
    """The Python files an ``auto_map`` names: {"AutoModelForCausalLM": "modeling_x.Cls"} -> modeling_x.py
    (also "other/repo--modeling_x.Cls" and a tokenizer's [slow, fast] pair)."""
    refs = auto_map.values() if isinstance(auto_map, dict) else []
    files = {ref.split("--")[-1].rsplit(".", 1)[0] + ".py"
             for value in refs for ref in (value if isinstance(value, list) else [value])
             if isinstance(ref, str) and "." in ref}
    return sorted(files)


def refuse_custom_code(folder: Path) -> None:
    """UserError, before any ``transformers`` call, unless a model folder loads without running its code.

    Refused: a config.json or tokenizer_config.json with ``auto_map`` (the folder's own Python classes,
    which ``transformers`` would import, after asking), and a config.json whose ``model_type`` is not
    one lmforge maps (only those load through ``transformers``' built-in classes).
    """
    config = folder / HF_CONFIG
    if not config.is_file():
        raise UserError(f"'{folder}' has no {HF_CONFIG} (not a Hugging Face model folder)")
    data = _read_json(config)
    tok_config = folder / TOKENIZER_CONFIG
    for path, found in ((config, data), (tok_config, _read_json(tok_config) if tok_config.is_file() else {})):
        if CODE_KEY in found:
            files = _code_files(found[CODE_KEY])
            raise UserError(f"'{path}' asks to run custom code ({CODE_KEY}{': ' if files else ''}"
                            f"{', '.join(files)}): lmforge never runs a model folder's code; "
                            f"supported: {', '.join(SUPPORTED)}")
    kind = data.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"'{config}': unsupported Hugging Face model_type "
                        f"{repr(kind) if isinstance(kind, str) else '(none)'} (supported: {', '.join(SUPPORTED)})")


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors weights, sharded (with an index) or not; never a pickle."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"'{index}' has no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        found = f"; found only pickled weights: {', '.join(pickles)}" if pickles else ""
        raise UserError(f"'{folder}' has no model.safetensors nor model.safetensors.index.json{found} "
                        f"(only safetensors weights are read, never pickles: they can run code when loaded)")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = folder / shard
        if not shard.endswith(".safetensors"):
            raise UserError(f"'{index}' lists '{shard}', which is no safetensors file "
                            f"(only safetensors weights are read, never pickles)")
        if not path.is_file():
            raise UserError(f"'{path}' is listed in the index but missing")
        try:
            sd.update(load_file(str(path)))
        except SafetensorError as e:
            raise UserError(f"'{path}' is not a readable safetensors file ({e})") from None
    return sd


def hub_reachable(repo_id: str) -> bool:
    """Whether the Hugging Face hub answers about ``repo_id`` within HUB_TIMEOUT_S, asked once: without a
    network, transformers' own downloads retry with back-off for about a minute before giving up. Any
    answer counts (no such model, gated, ...: transformers then says which); UserError if ``repo_id``
    cannot be a hub id either."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, HF_CONFIG), timeout=HUB_TIMEOUT_S)
    except HFValidationError:
        raise UserError(f"'{repo_id}' is no local folder (it does not exist) and no hub id either") from None
    except HfHubHTTPError:
        return True
    except Exception:  # noqa: BLE001 - no network, a timeout, HF_HUB_OFFLINE: each HTTP library has its own types
        return False
    return True


def load_hf(source: str | Path) -> tuple[Backbone | SequenceClassifier, Tokenizer | None]:
    """Model (fp32, eval) and tokenizer from a local ``save_pretrained`` folder or a hub id: a GPT for a causal LM,
    an Encoder for a BERT, a SequenceClassifier on one for a BertForSequenceClassification (its labels:
    :func:`hf_folder_labels`), an EncoderDecoder for a BART.

    A hub id is downloaded by ``transformers`` (it needs the network; its code is never run, only its
    safetensors weights are read, with the auto class of what its config says it is, once the config is known to
    import); when the hub cannot be reached, only the local hub cache is looked at, so the answer comes in seconds.
    A folder is checked (:func:`refuse_custom_code`) and read directly.
    """
    import transformers
    from transformers import AutoConfig

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache
        from transformers import AutoTokenizer

        offline = not hub_reachable(str(source))
        unreachable = UserError(f"'{source}' is not a local folder and the Hugging Face hub cannot be reached (no "
                                f"network?): pass a folder saved with save_pretrained, e.g. made by `lmforge export`")
        if offline and not isinstance(try_to_load_from_cache(str(source), HF_CONFIG), str):
            raise unreachable
        # Offline, a model in the local hub cache still loads. adapter_kwargs too: transformers' look for a PEFT
        # adapter does not inherit local_files_only, and would ask the hub again, with retries, for half a minute.
        try:
            hf_cfg = AutoConfig.from_pretrained(str(source), trust_remote_code=False, local_files_only=offline)
            config_from_hf(hf_cfg)  # an architecture we cannot compute is refused before its weights download
            auto = getattr(transformers, AUTO_CLASSES[hf_task(hf_cfg)])
            hf = auto.from_pretrained(str(source), config=hf_cfg, torch_dtype=torch.float32, trust_remote_code=False,
                                      use_safetensors=True, local_files_only=offline,
                                      adapter_kwargs={"local_files_only": offline})
            tok_dir = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False, local_files_only=offline)
        except OSError as e:
            if offline:
                raise unreachable from None
            raise UserError(f"'{source}' is neither a local folder nor a reachable hub model with "
                            f"safetensors weights ({' '.join(str(e).split())})") from None
        except ValueError as e:  # custom code (trust_remote_code=False), an unknown model type
            raise UserError(f"hub model '{source}': {' '.join(str(e).split())} (lmforge never runs a "
                            f"model's own code; supported: {', '.join(SUPPORTED)})") from None
        model = from_hf_model(hf)
        return model, Tokenizer.from_str(tok_dir.backend_tokenizer.to_str())
    refuse_custom_code(folder)
    where = folder / HF_CONFIG
    try:
        hf_cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers and huggingface_hub raise their own types for a bad file
        raise UserError(f"'{where}': cannot read it ({' '.join(str(e).split())})") from None
    sd = {k: v.float() for k, v in _read_hf_weights(folder).items()}
    try:
        cfg = config_from_hf(hf_cfg, sd.keys())  # the weights say what the config does not (BERT's pooler)
        cfg.validate()  # the values by meaning, as for a config of ours
        labels = hf_labels(hf_cfg)
    except UserError as e:
        raise UserError(f"'{where}': {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type, or a key missing
        raise UserError(f"'{where}': {type(e).__name__}: {' '.join(str(e).split())}") from None
    model = new_model(cfg, labels)
    try:
        model.load_state_dict(from_hf_state_dict(model, sd))
    except RuntimeError as e:
        raise UserError(f"the weights in '{folder}' do not fit its {HF_CONFIG}: {mismatch_detail(e)}") from None
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        tokenizer.check_fits(cfg.vocab_size)
    return model.eval(), tokenizer


def hf_folder_labels(folder: str | Path) -> list[str] | None:
    """The class names of a sequence-classifier folder (its config.json's id2label, in id order), None for other
    models; for a folder that :func:`load_hf` read."""
    from transformers import AutoConfig

    return hf_labels(AutoConfig.from_pretrained(str(folder), trust_remote_code=False))


def import_hf(source: str | Path, out_dir: str | Path) -> Path:
    """Write an HF model as an lmforge run directory (run.json, config.yaml, tokenizer.json, its chat
    template if it has one, and a checkpoint of step 0)."""
    out = Path(out_dir)
    check_new_folder(out)
    model, tokenizer = load_hf(source)
    if isinstance(model, SequenceClassifier):  # a run of it would be a fine-tuning run, without a base
        raise UserError(f"'{source}' is a sequence classifier (BertForSequenceClassification): lmforge import takes "
                        f"language models and encoders; use the folder itself wherever a run is accepted "
                        f"(lmforge predict, evaluate)")
    if tokenizer is None:
        raise UserError(f"'{source}' has no tokenizer.json (lmforge needs the fast-tokenizer file)")
    cfg = TrainConfig(out_dir=str(out), model=model.cfg)
    tmp = temporary_sibling(out)  # renamed into place when complete, as export_hf's folder
    try:
        with rundir.storage_errors(out, "importing into", "nothing was written; free some space and import again"):
            tmp.mkdir(parents=True)
            save_yaml(cfg, tmp / rundir.CONFIG)
            tokenizer.save(tmp / rundir.TOKENIZER)
            if Path(source).is_dir():
                own = find_chat_template(Path(source))
                if own is not None:  # keep the model's own chat format for SFT and `generate --chat`
                    ChatTemplate(own[0], tokenizer, own[1]).save(tmp)
            save_weights_only(tmp, 0, model)
            rundir.write_run_info(tmp, "imported", rundir.backbone_task(model.cfg.arch))
            check_new_folder(out)  # again: something may have been written there meanwhile
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_command(o: ImportOptions) -> None:
    """``lmforge import``: the folder (or hub id) as a run directory."""
    out = import_hf(o.source, o.out)
    print(f"imported '{o.source}' into {out} (use it wherever a run directory is accepted)")


def _encoder_tokenizer(tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[PreTrainedTokenizerFast, int, str | None]:
    """An encoder's tokenizer as BERT's: (the fast tokenizer, its [PAD] id, vocab.txt's text or None).

    The fast tokenizer names [CLS] [SEP] [MASK] [PAD] (and the unknown token), returns token types, and frames a text
    as ``[CLS] text [SEP]`` as the encoder was trained (a trained WordPiece has that template; one without any
    post-processor gets it). vocab.txt, the vocabulary in id order, is BERT's own format, written only for WordPiece
    (for tools that read it; ``transformers`` reads tokenizer.json).
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: encoder_tokens() adds the special tokens it lacks
    marks = tok.encoder_tokens()
    tok.check_fits(cfg.vocab_size)
    if tok.hf.post_processor is None:
        tok.hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", marks.cls), ("[SEP]", marks.sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   pad_token="[PAD]", unk_token=_unk_token(tok),
                                   model_max_length=cfg.block_size,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    vocab = None
    if isinstance(tok.hf.model, models.WordPiece):
        by_id = {i: t for t, i in tok.hf.get_vocab(with_added_tokens=True).items()}
        vocab = "".join(f"{by_id.get(i, f'[unused{i}]')}\n" for i in range(tok.vocab_size))
    return fast, marks.pad, vocab


def _unk_token(tok: Tokenizer) -> str | None:
    """The unknown token of the tokenizer's model, where it has one in its vocabulary."""
    unk = getattr(tok.hf.model, "unk_token", None)
    return unk if unk and tok.token_to_id(unk) is not None else None


def _seq2seq_tokenizer(tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[PreTrainedTokenizerFast, Seq2SeqTokens]:
    """An encoder-decoder's tokenizer for ``transformers``: (the fast tokenizer, its special ids).

    It frames a text as the encoder read its sources (:func:`lmforge.data.seq2seq.frame_source`: the tokens, then
    end-of-text; that template replaces any the tokenizer had), pads with ``[PAD]``, and names end-of-text, ``[PAD]``
    and ``[MASK]`` as its eos, pad and mask tokens.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: Seq2SeqTokens.of adds [PAD] and [MASK] where it lacks them
    tokens = Seq2SeqTokens.of(tok)
    tok.check_fits(cfg.vocab_size)
    eos = tok.hf.id_to_token(tokens.eos)
    tok.hf.post_processor = processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B:1", f"{eos}:1"],
                                                          special_tokens=[(eos, tokens.eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=eos, pad_token=tok.hf.id_to_token(tokens.pad),
                                   mask_token=tok.hf.id_to_token(tokens.mask), unk_token=_unk_token(tok),
                                   model_max_length=cfg.block_size)
    return fast, tokens


def set_seq2seq_generation(hf: PreTrainedModel, tokens: Seq2SeqTokens, max_length: int) -> None:
    """Give a BartForConditionalGeneration of ours (``lmforge.model.hf.to_hf_model``) our special ids, and generation
    defaults that make ``hf.generate(input_ids, attention_mask=...)`` plain greedy decoding as lmforge's: the decoder
    starts from end-of-text (BART's decoder_start_token_id = eos) and stops there, batches pad with ``[PAD]``, no
    forced first or last token, no n-gram blocking, one beam, at most ``max_length`` decoder tokens (block_size,
    the start token included)."""
    for settings in (hf.config, hf.generation_config):
        settings.pad_token_id = tokens.pad
        settings.bos_token_id = settings.eos_token_id = settings.decoder_start_token_id = tokens.eos
        settings.forced_eos_token_id = None
    g = hf.generation_config
    g.forced_bos_token_id = None
    g.no_repeat_ngram_size, g.num_beams, g.do_sample, g.max_length = 0, 1, False, max_length
    g._from_model_config = False  # settings of its own, never to be re-derived from the model's config


def export_hf(model: Backbone | SequenceClassifier, tokenizer: Tokenizer, out_dir: str | Path,
              chat_template: tuple[str, str | None] | None = None, labels: list[str] | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a folder that ``transformers``' auto classes load: a decoder for
    ``AutoModelForCausalLM``, an encoder for ``AutoModelForMaskedLM`` (BertForMaskedLM), a classifier on an encoder
    for ``AutoModelForSequenceClassification`` (BertForSequenceClassification, with ``labels`` as id2label), an
    encoder-decoder for ``AutoModelForSeq2SeqLM`` (BartForConditionalGeneration, whose ``generate`` decodes greedily
    as ours), and the tokenizer for ``AutoTokenizer``.

    chat_template: (Jinja template, end-of-answer token) of a chat model, for
    ``tokenizer.apply_chat_template``; generation then also stops at that token (decoders only).
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    check_new_folder(out)
    if next(model.parameters()).dtype != torch.float32:  # export fp32 without changing the caller's model
        model = copy.deepcopy(model).float()
    hf = to_hf_model(model, labels)
    cfg = model.backbone.cfg if isinstance(model, SequenceClassifier) else model.cfg
    vocab = None
    if cfg.arch == "encoder":  # BERT's tokenizer files; no generation settings (an encoder neither writes nor chats)
        fast, hf.config.pad_token_id, vocab = _encoder_tokenizer(tokenizer, cfg)
    elif cfg.arch == "encoder_decoder":
        fast, tokens = _seq2seq_tokenizer(tokenizer, cfg)
        set_seq2seq_generation(hf, tokens, cfg.block_size)
    else:
        eot = tokenizer.eot_id
        hf.config.bos_token_id = hf.config.eos_token_id = eot
        hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = eot
        hf.generation_config.pad_token_id = eot
        eot_text = tokenizer.hf.id_to_token(eot)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token=eot_text, eos_token=eot_text,
                                       pad_token=eot_text, model_max_length=cfg.block_size)
        if chat_template is not None:
            template, turn_end = chat_template
            fast.chat_template = template
            turn_end_id = tokenizer.token_to_id(turn_end) if turn_end else None
            if turn_end_id is not None and turn_end_id != eot:
                hf.generation_config.eos_token_id = [eot, turn_end_id]
    # Written beside `out` and renamed: a failure (a full disk) leaves no half folder to block the retry.
    tmp = temporary_sibling(out)
    try:
        with rundir.storage_errors(out, "exporting to", "nothing was written; free some space and export again"):
            hf.save_pretrained(str(tmp), safe_serialization=True)
            fast.save_pretrained(str(tmp))
            if vocab is not None:
                (tmp / "vocab.txt").write_text(vocab, encoding="utf-8")
            check_new_folder(out)  # again: something may have been written there meanwhile
            os.replace(tmp, out)  # over an empty folder too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
