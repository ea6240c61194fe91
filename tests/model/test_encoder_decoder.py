"""The encoder-decoder: decoding with the cache equals the full pass, source padding changes nothing, and the
parts are where the architecture says."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import EncoderDecoder, build_model

SHAPES = {
    "bart": dict(pos_embedding="learned", norm="layernorm", mlp="gelu", post_norm=True),
    "llama-ish": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, decoder_layers=3),
}


def tiny(shape: str) -> EncoderDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="encoder_decoder", vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64,
                      **SHAPES[shape])
    return build_model(cfg).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_decoding_token_by_token_with_the_cache_equals_the_full_pass(shape):
    model = tiny(shape)
    src = torch.randint(0, 97, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    tgt = torch.randint(0, 97, (2, 7))
    full, _ = model(src, tgt, src_mask=src_mask)
    model.setup_cache(model.encode(src, src_mask), max_len=16)
    stepped = torch.cat([model.decode(tgt[:, t:t + 1], None, src_mask, cache_start=t) for t in range(7)], dim=1)
    # float32 on CPU: measured max |diff| 3e-7 (the same sums in another order).
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)


def test_a_padded_source_gives_what_the_unpadded_one_gives():
    model = tiny("bart")
    src, tgt = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    padded = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    torch.testing.assert_close(model(padded, tgt, src_mask=mask)[0], model(src, tgt)[0], rtol=0, atol=1e-5)


def test_the_decoder_reads_the_source_and_only_the_past_of_the_target():
    model = tiny("bart")
    src, tgt = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    logits = model(src, tgt)[0]
    other_src = src.clone()
    other_src[0, 0] = (src[0, 0] + 1) % 97
    assert not torch.allclose(model(other_src, tgt)[0][:, 0], logits[:, 0])  # the first position reads the source
    later = tgt.clone()
    later[0, 3] = (tgt[0, 3] + 1) % 97
    torch.testing.assert_close(model(src, later)[0][:, :3], logits[:, :3])  # nothing reads a later target token


def test_loss_ignores_padded_labels_and_the_output_head_is_the_embedding():
    model = tiny("bart")
    src, tgt = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 5))
    labels = torch.randint(0, 97, (2, 5))
    labels[1, 3:] = -100
    logits, loss = model(src, tgt, labels)
    kept = labels != -100
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[kept], labels[kept]))
    assert model.lm_head.weight is model.wte.weight and model.lm_head.bias is not None
