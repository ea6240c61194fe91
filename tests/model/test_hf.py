"""Round trips of the in-memory mapping (lmforge.model.hf) against `transformers` itself, on tiny
random models built here (no hub access)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.errors import UserError  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.model.hf import config_from_hf, from_hf_model, hf_config, to_hf_model  # noqa: E402
from tests.fixtures import hf_gpt2, hf_llama, tiny_model  # noqa: E402

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
    cfg = transformers.T5Config()
    with pytest.raises(UserError, match="unsupported Hugging Face model_type 't5'.*gpt2, llama"):
        config_from_hf(cfg)


def our_gpt(**kw):
    from lmforge.config import ModelConfig
    from lmforge.model.gpt import GPT

    cfg = ModelConfig(**{"vocab_size": 101, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64, **kw})
    cfg.validate()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # biases start at zero and norms at one: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


GPT2 = {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu"}
LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False}
OURS = {"gpt2-exact-gelu": GPT2, "gpt2-tanh-untied": {**GPT2, "mlp": "gelu_tanh", "tie_embeddings": False},
        "gpt2-no-bias": {**GPT2, "bias": False}, "gpt2-gqa": {**GPT2, "n_kv_head": 2},
        "llama-gqa": {**LLAMA, "n_kv_head": 2, "rope_theta": 500.0},
        "llama-tied-bias": {**LLAMA, "tie_embeddings": True, "bias": True}}


@pytest.mark.parametrize("name", OURS)
def test_export_then_import_keeps_logits_and_greedy_output(name):
    ours = our_gpt(**OURS[name])
    idx = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(idx)[0]
        hf = to_hf_model(ours)
        assert (hf(idx).logits - ref).abs().max() <= 1e-4
        assert (from_hf_model(hf)(idx)[0] - ref).abs().max() <= 1e-4
    prompt = idx[:1, :8]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert generate(ours, prompt.tolist(), 12, temperature=0.0)[0] == theirs


@pytest.mark.parametrize("kw", [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True}])
def test_gpt2_attention_scaling_variants_are_refused(kw):
    with pytest.raises(UserError, match="attention scaling"):
        config_from_hf(transformers.GPT2Config(**kw))


def test_non_silu_llama_is_refused():
    with pytest.raises(UserError, match="hidden_act 'gelu'"):
        config_from_hf(transformers.LlamaConfig(hidden_act="gelu"))


def test_sliding_window_caps_the_context_and_stays_exact():
    cfg = transformers.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     sliding_window=16)
    assert config_from_hf(cfg).block_size == 16
    assert config_from_hf(transformers.Qwen2Config(use_sliding_window=False, sliding_window=16)).block_size > 16
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (from_hf_model(hf)(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("option", [{"qk_norm": True}, {"logit_softcap": 30.0}, {"mlp": "relu2"}])
def test_a_model_with_options_transformers_lacks_is_refused_for_export_naming_them(option):
    cfg = tiny_model("llama-tiny", **option).cfg
    key = next(iter(option))
    with pytest.raises(UserError, match=f"{key}=.* is neither GPT-2 .*; to be .* it needs .*model.{key}=.*, which "
                                        f"preset .* has, so transformers cannot load it$"):
        hf_config(cfg)


def test_a_block_of_neither_family_is_refused_for_export_naming_its_parts():
    cfg = tiny_model("gpt2-tiny", pos_embedding="rope", norm="rmsnorm", bias=False).cfg
    with pytest.raises(UserError) as e:
        hf_config(cfg)
    # The missing piece, and the preset (the default model's) that has it.
    assert str(e.value) == ("model: pos_embedding=rope, norm=rmsnorm, mlp=gelu is neither GPT-2 (learned, layernorm, "
                            "gelu) nor Llama (rope, rmsnorm, swiglu); to be Llama it needs model.mlp=swiglu, which "
                            "preset llama-mini has, so transformers cannot load it")
