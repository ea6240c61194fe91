"""LoRA through ``peft``: add low-rank adapters to chosen linear layers, train only those.

A LoRA checkpoint holds only the trainable tensors (``adapter.safetensors``: the adapters and any
new head); the frozen base weights are read again from the run's base model. Loading a run needs
this as much as fine-tuning does, so it lives with the model. Merging folds
``B @ A * alpha / rank`` into each adapted weight and gives back a plain model.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import LoraSettings
from lmforge.errors import UserError
from lmforge.model.encoder_decoder import CrossAttention


def apply_lora(model: nn.Module, cfg: LoraSettings, trainable_modules: list[str] | None = None) -> nn.Module:
    """``model`` wrapped by peft with adapters on ``cfg.target_modules``; everything else frozen
    except ``trainable_modules`` (e.g. a new classification head), which train in full."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(cfg.target_modules) - names)
    if unknown:
        raise UserError(f"lora.target_modules: no linear layer named {', '.join(unknown)} "
                        f"(this model has: {', '.join(sorted(names))})")
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=target_names(model, cfg.target_modules), modules_to_save=trainable_modules)
    return get_peft_model(model, config)


def target_names(model: nn.Module, names: list[str]) -> list[str]:
    """The linear layers' names that get adapters: ``names``, where ``qkv`` (attention's input projection) also names
    a cross-attention's ``q`` and ``kv``, the same projection split in two because its keys and values read the
    encoder's output; so the default targets adapt an encoder-decoder's attention on both sides and between them."""
    out = list(names)
    if "qkv" in names and any(isinstance(m, CrossAttention) for m in model.modules()):
        out += [n for n in ("q", "kv") if n not in out]
    return out


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_adapter(model: nn.Module, path: Path) -> None:
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(path))


def load_adapter(model: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"adapter '{path}' does not fit this model: unexpected {unexpected[:3]}")


def merge(model: nn.Module) -> nn.Module:
    """The base model with the adapters folded into its weights (peft's merge_and_unload)."""
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged

