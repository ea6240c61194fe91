"""Round trips against `transformers` itself, on tiny random models built here (no hub access)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.errors import UserError  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.interop import config_from_hf, from_hf_model, to_hf_model  # noqa: E402


def hf_gpt2(tie: bool = True):
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(tie: bool = False, **kw):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=5000.0, tie_word_embeddings=tie, **kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


MODELS = {"gpt2-tied": lambda: hf_gpt2(True), "gpt2-untied": lambda: hf_gpt2(False),
          "llama-gqa": lambda: hf_llama(False), "llama-tied": lambda: hf_llama(True),
          "llama-bias": lambda: hf_llama(False, attention_bias=True, mlp_bias=True)}


@pytest.mark.parametrize("name", MODELS)
def test_import_then_export_keeps_logits_and_greedy_output(name):
    hf = MODELS[name]()
    idx = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = from_hf_model(hf)
        assert (ours(idx)[0] - ref).abs().max() <= 1e-4
        back = to_hf_model(ours)
        assert (back(idx).logits - ref).abs().max() <= 1e-4
    prompt = idx[:1, :8]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    mine = generate(ours, prompt.tolist(), 12, temperature=0.0)[0]
    assert mine == theirs


def test_unsupported_architecture_is_named():
    cfg = transformers.BertConfig()
    with pytest.raises(UserError, match="unsupported Hugging Face model_type 'bert'.*gpt2, llama"):
        config_from_hf(cfg)
