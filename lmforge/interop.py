"""Hugging Face `transformers` interop on disk: model folders in ``save_pretrained`` format, in and out.

This module keeps only the folders: reading one (local or a hub id) into our GPT and tokenizer
(``load_hf``), writing it as an lmforge run directory (``import_hf``), and writing our model and
tokenizer as a folder ``transformers`` loads (``export_hf``). The in-memory mapping, configs both
ways and the parameter-name tables per family, lives in ``lmforge.model.hf``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge import rundir
from lmforge.chat import ChatTemplate, find_chat_template
from lmforge.config import TrainConfig, save_yaml
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.model.hf import SUPPORTED, config_from_hf, from_hf_model, from_hf_state_dict, to_hf_model
from lmforge.train.checkpoint import save_weights_only

HF_CONFIG = "config.json"


def is_hf_folder(path: str | Path) -> bool:
    """A ``save_pretrained`` folder: it has transformers' config.json and is no lmforge run directory."""
    p = Path(path)
    return (p / HF_CONFIG).is_file() and not rundir.is_run_dir(p)


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors weights, sharded (with an index) or not."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"'{folder}' has no model.safetensors nor model.safetensors.index.json "
                        f"(only safetensors weights are read, never pickles)")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise UserError(f"'{folder / shard}' is listed in the index but missing")
        sd.update(load_file(str(folder / shard)))
    return sd


def load_hf(source: str | Path) -> tuple[GPT, Tokenizer | None]:
    """Model (fp32, eval) and tokenizer from a local ``save_pretrained`` folder or a hub id.

    A hub id is downloaded by ``transformers`` (it needs the network); a folder is read directly.
    """
    from transformers import AutoConfig

    folder = Path(source)
    if not folder.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            hf = AutoModelForCausalLM.from_pretrained(str(source), torch_dtype=torch.float32)
            tok_dir = AutoTokenizer.from_pretrained(str(source))
        except OSError as e:
            raise UserError(f"'{source}' is neither a local folder nor a reachable hub model ({e})") from None
        model = from_hf_model(hf)
        return model, Tokenizer.from_str(tok_dir.backend_tokenizer.to_str())
    try:
        hf_cfg = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        kind = json.loads((folder / "config.json").read_text()).get("model_type", "?") \
            if (folder / "config.json").is_file() else "?"
        if (folder / "config.json").is_file() and kind not in SUPPORTED:
            raise UserError(f"unsupported Hugging Face model_type '{kind}' (supported: {', '.join(SUPPORTED)})") \
                from None
        raise UserError(f"'{folder}': cannot read config.json ({e})") from None
    cfg = config_from_hf(hf_cfg)
    model = GPT(cfg)
    sd = {k: v.float() for k, v in _read_hf_weights(folder).items()}
    model.load_state_dict(from_hf_state_dict(cfg, sd))
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        tokenizer.check_fits(cfg.vocab_size)
    return model.eval(), tokenizer


def import_hf(source: str | Path, out_dir: str | Path) -> Path:
    """Write an HF model as an lmforge run directory (run.json, config.yaml, tokenizer.json, its chat
    template if it has one, and a checkpoint of step 0)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty (nothing was overwritten)")
    model, tokenizer = load_hf(source)
    if tokenizer is None:
        raise UserError(f"'{source}' has no tokenizer.json (lmforge needs the fast-tokenizer file)")
    cfg = TrainConfig(out_dir=str(out), model=model.cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / rundir.CONFIG)
    tokenizer.save(out / rundir.TOKENIZER)
    if Path(source).is_dir():
        own = find_chat_template(Path(source))
        if own is not None:  # keep the model's own chat format for SFT and `generate --chat`
            ChatTemplate(own[0], tokenizer, own[1]).save(out)
    save_weights_only(out, 0, model)
    rundir.write_run_info(out, "imported", "lm")
    return out


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path,
              chat_template: tuple[str, str | None] | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.

    chat_template: (Jinja template, end-of-answer token) of a chat model, for
    ``tokenizer.apply_chat_template``; generation then also stops at that token.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty (nothing was overwritten)")
    if next(model.parameters()).dtype != torch.float32:  # export fp32 without changing the caller's model
        model = copy.deepcopy(model).float()
    hf = to_hf_model(model)
    eot = tokenizer.eot_id
    hf.config.bos_token_id = hf.config.eos_token_id = eot
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = eot
    hf.generation_config.pad_token_id = eot
    hf.save_pretrained(str(out), safe_serialization=True)
    eot_text = tokenizer.hf.id_to_token(eot)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token=eot_text, eos_token=eot_text,
                                   pad_token=eot_text, model_max_length=model.cfg.block_size)
    if chat_template is not None:
        template, turn_end = chat_template
        fast.chat_template = template
        turn_end_id = tokenizer.token_to_id(turn_end) if turn_end else None
        if turn_end_id is not None and turn_end_id != eot:
            hf.generation_config.eos_token_id = [eot, turn_end_id]
            hf.generation_config.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out
