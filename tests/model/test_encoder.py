"""The encoder: bidirectional attention, padding that changes nothing, the masked-LM head on chosen positions, and
its options (post-norm, token types, pooler) where the config allows them."""

import pytest
import torch

from lmforge.config import ModelConfig, from_dict
from lmforge.errors import UserError
from lmforge.model import Encoder, build_model
from lmforge.model.classifier import SequenceClassifier

SHAPES = [pytest.param("bert-tiny", {}, id="bert"),
          pytest.param("llama-tiny", {"arch": "encoder"}, id="pre-norm-rope-gqa")]


def tiny_encoder(preset: str = "bert-tiny", **overrides) -> Encoder:
    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, {"preset": preset, "vocab_size": 97, "block_size": 32,
                                               **overrides})).eval()


@pytest.mark.parametrize(("preset", "options"), SHAPES)
def test_every_position_reads_every_other(preset, options):
    model = tiny_encoder(preset, **options)
    x = torch.randint(0, 97, (2, 20))
    h = model.hidden_states(x)
    x2 = x.clone()
    x2[:, 19] = (x2[:, 19] + 1) % 97
    assert (model.hidden_states(x2)[:, 0] - h[:, 0]).abs().max() > 1e-4  # the first token saw the last change


@pytest.mark.parametrize(("preset", "options"), SHAPES)
def test_padding_changes_nothing_at_the_real_positions(preset, options):
    model = tiny_encoder(preset, **options)
    x = torch.randint(0, 97, (1, 12))
    alone = model.hidden_states(x)
    padded = torch.cat([x, torch.zeros(1, 8, dtype=torch.long)], 1)
    mask = torch.arange(20)[None] < 12
    torch.testing.assert_close(model.hidden_states(padded, attention_mask=mask)[:, :12], alone, atol=1e-5, rtol=1e-5)
    lengths = torch.tensor([12])
    torch.testing.assert_close(model.sequence_representation(padded, lengths),
                               model.sequence_representation(x, lengths), atol=1e-5, rtol=1e-5)


def test_the_head_on_chosen_positions_gives_those_positions_logits_and_their_loss():
    model = tiny_encoder()
    x = torch.randint(0, 97, (2, 16))
    full, _ = model(x)
    positions = torch.tensor([[1, 5, 9], [2, 3, 15]])
    targets = torch.tensor([[4, 8, -100], [1, 2, 3]])
    logits, loss = model(x, targets, masked=positions)
    torch.testing.assert_close(logits, full.gather(1, positions[..., None].expand(-1, -1, 97)))
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, expected)


def test_token_types_and_the_pooler_are_used_and_counted():
    model = tiny_encoder()
    x = torch.randint(0, 97, (1, 10))
    types = torch.zeros_like(x)
    types[:, 5:] = 1
    assert not torch.allclose(model.hidden_states(x, token_types=types), model.hidden_states(x))
    cfg = model.cfg
    embeddings = sum(e.weight.numel() for e in (model.wte, model.wpe, model.wtt)) + model.lm_head.bias.numel()
    assert sum(p.numel() for p in model.parameters()) == cfg.params_without_embeddings + embeddings
    first = model.hidden_states(x)[:, 0]
    torch.testing.assert_close(model.sequence_representation(x, torch.tensor([10])),
                               torch.tanh(model.pooler(first)))


def test_a_classifier_on_an_encoder_has_a_biased_head_and_on_a_decoder_none():
    assert SequenceClassifier(tiny_encoder(), 3).score.bias is not None
    decoder = build_model(from_dict(ModelConfig, {"preset": "gpt2-tiny", "vocab_size": 97}))
    assert SequenceClassifier(decoder, 3).score.bias is None


@pytest.mark.parametrize("key", ["post_norm=true", "type_vocab_size=2", "pooler=true"])
def test_encoder_options_on_a_decoder_are_refused_in_one_line(key):
    name, value = key.split("=")
    cfg = from_dict(ModelConfig, {"preset": "gpt2-tiny", name: {"true": True}.get(value) or int(value)})
    with pytest.raises(UserError, match=f"model.{name}={value} is an option of encoders.*; this model is a decoder"):
        cfg.validate()


def test_bert_presets_are_bert_and_other_encoders_say_what_bert_needs():
    for name in ("bert-tiny", "bert-mini", "bert-small"):
        cfg = from_dict(ModelConfig, {"preset": name})
        assert cfg.standard_family == "bert" and cfg.export_problem() is None
    rope = from_dict(ModelConfig, {"preset": "llama-mini", "arch": "encoder"})
    assert rope.export_problem() == (
        "model: arch=encoder, pos_embedding=rope, norm=rmsnorm, mlp=swiglu, post_norm=false is not BERT (learned, "
        "layernorm, gelu, post_norm); to be BERT it needs model.pos_embedding=learned, model.norm=layernorm, "
        "model.mlp=gelu, model.post_norm=true, which preset bert-mini has")


def test_an_encoder_context_too_short_to_mask_is_refused():
    with pytest.raises(UserError, match="model.block_size': expected at least 4 for an encoder"):
        from_dict(ModelConfig, {"preset": "bert-tiny", "block_size": 2}).validate()
