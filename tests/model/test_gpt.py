import pytest
import torch

from lmforge.config import ModelConfig, from_dict
from lmforge.errors import UserError
from lmforge.model.gpt import GPT, flops_per_token
from lmforge.model.presets import PRESETS
from tests.conftest import tiny_model


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_changing_token_t_never_changes_logits_before_t(preset):
    model = tiny_model(preset)
    x = torch.randint(0, 97, (2, 20))
    logits, _ = model(x)
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 97
        logits2, _ = model(x2)
        assert torch.equal(logits[:, :t], logits2[:, :t]), f"position < {t} changed"
        assert not torch.allclose(logits[:, t:], logits2[:, t:]), "the change had no effect at all"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_kv_cache_forward_matches_full_forward(preset):
    model = tiny_model(preset)
    x = torch.randint(0, 97, (3, 16))
    full, _ = model(x)
    model.setup_cache(3, 16)
    prefill, _ = model(x[:, :10], cache_start=0)
    steps = [model(x[:, t:t + 1], cache_start=t)[0] for t in range(10, 16)]
    model.clear_cache()
    torch.testing.assert_close(prefill, full[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 10:], atol=1e-5, rtol=1e-5)


def test_gqa_uses_fewer_kv_heads():
    model = tiny_model("llama-tiny")
    attn = model.blocks[0].attn
    assert attn.n_kv == 2 and attn.n_head == 4
    assert attn.qkv.out_features == (4 + 2 * 2) * attn.hd


def test_tied_embeddings_share_storage_and_untied_do_not():
    m = tiny_model("gpt2-tiny")
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    m = tiny_model("llama-tiny")
    assert m.lm_head.weight.data_ptr() != m.wte.weight.data_ptr()


def test_loss_ignores_minus_100_targets_and_starts_near_uniform():
    model = tiny_model()
    x, y = torch.randint(0, 97, (2, 4, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    masked = torch.where(torch.arange(32) < 16, -100, y)
    _, l_masked = model(x, masked)
    logits, _ = model(x)
    manual = torch.nn.functional.cross_entropy(logits[:, 16:].reshape(-1, 97), y[:, 16:].reshape(-1))
    torch.testing.assert_close(l_masked, manual)


def test_presets_build_and_report_params_and_flops():
    for name in PRESETS:
        cfg = from_dict(ModelConfig, {"preset": name, "vocab_size": 256, "n_layer": 1})
        model = GPT(cfg)
        n = model.num_params()
        assert 0 < n < model.num_params(non_embedding=False) or cfg.pos_embedding == "rope"
        assert flops_per_token(cfg, n) > 6 * n


def test_flops_formula():
    cfg = ModelConfig(vocab_size=10, n_layer=2, n_head=4, n_embd=64, block_size=128)
    assert flops_per_token(cfg, 1000) == 6 * 1000 + 12 * 2 * 4 * 16 * 128


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="n_embd=100 must be divisible by model.n_head=3"):
        ModelConfig(n_embd=100, n_head=3).validate()
    with pytest.raises(UserError, match="unknown model preset 'gpt5'"):
        from_dict(ModelConfig, {"preset": "gpt5"})
