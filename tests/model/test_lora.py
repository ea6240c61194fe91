"""LoRA through peft: few trainable parameters, merged weights equal adapters + base."""

import pytest
import torch

from lmforge import rundir
from lmforge.config import LoraSettings
from lmforge.errors import UserError
from lmforge.model import lora
from tests.fixtures import tiny_model


def _with_trained_adapters(model: torch.nn.Module) -> torch.nn.Module:
    peft_model = lora.apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter): give it what training would
            torch.nn.init.normal_(p, std=0.05)
    return peft_model.eval()


def test_only_adapters_train_and_they_are_a_small_fraction():
    model = _with_trained_adapters(tiny_model(n_layer=4, n_embd=256))
    trainable, total = lora.trainable_fraction(model)
    assert 0 < trainable / total < 0.05
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_merged_weights_give_the_same_logits_as_adapters_on_the_base():
    model = _with_trained_adapters(tiny_model())
    base_logits = tiny_model()(torch.arange(16)[None])[0]
    x = torch.arange(16)[None]
    with torch.no_grad():
        adapted = model(x)[0]
        merged = lora.merge(model)(x)[0]
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_adapters_save_and_load_exactly(tmp_path):
    model = _with_trained_adapters(tiny_model())
    lora.save_adapter(model, tmp_path / rundir.ADAPTER)
    fresh = lora.apply_lora(tiny_model(), LoraSettings(rank=4, alpha=8, dropout=0.0)).eval()
    lora.load_adapter(fresh, tmp_path / rundir.ADAPTER)
    x = torch.arange(16)[None]
    torch.testing.assert_close(fresh(x)[0], model(x)[0])


def test_unknown_target_modules_are_named():
    with pytest.raises(UserError, match="no linear layer named q_proj"):
        lora.apply_lora(tiny_model(), LoraSettings(rank=4, target_modules=["q_proj"]))
