"""SFT data: the chat template, loss masking, packing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lmforge.data.records import BadRecord
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.finetuning import sft
from tests.fixtures import tiny_model

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :#\n.,?!<>|_-'"


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.train_char([TEXT])


def _learned_text(tok: Tokenizer, example: sft.Example) -> str:
    return tok.decode([t for t in example.targets if t != sft.IGNORE])


def test_only_the_answer_and_its_end_token_are_learned(tok):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tok)
    messages = sft.record_to_messages({"prompt": "Repeat: cat", "response": "cat"}, "prompt", "response", "messages")
    example = sft.encode_example(messages, tok, template, max_len=64)
    assert _learned_text(tok, example) == "cat<|endoftext|>"
    assert tok.decode(example.inputs).startswith("### User:\nRepeat: cat\n\n### Assistant:\ncat")


def test_every_assistant_turn_of_a_conversation_is_learned_and_nothing_else(tok):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye"}]
    pieces = [text for text, learned in template.segments(messages) if learned]
    assert pieces == ["Hello<|endoftext|>", "Bye<|endoftext|>"]
    assert "".join(text for text, _ in template.segments(messages)) == template.render(messages)


def test_changing_prompt_labels_leaves_the_loss_unchanged_and_answer_labels_change_it(tok):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tok)
    messages = [{"role": "user", "content": "Repeat: dog"}, {"role": "assistant", "content": "dog"}]
    example = sft.encode_example(messages, tok, template, max_len=64)
    model = tiny_model(vocab_size=tok.vocab_size, block_size=64)
    x = torch.tensor([example.inputs])
    logits, _ = model(x)
    full_targets = torch.tensor([example.inputs[1:] + [tok.eot_id]])  # every next token, unmasked
    learned = torch.tensor([[t != sft.IGNORE for t in example.targets]])

    def loss(labels: torch.Tensor) -> float:
        # The masking rule of sft_loss: targets outside the answer are ignored.
        return F.cross_entropy(logits[0], labels.masked_fill(~learned, sft.IGNORE)[0], ignore_index=sft.IGNORE).item()

    base = loss(full_targets)
    assert base == pytest.approx(model(x, torch.tensor([example.targets]))[1].item(), rel=1e-6)
    scrambled_prompt = torch.where(learned, full_targets, torch.randint_like(full_targets, tok.vocab_size))
    assert loss(scrambled_prompt) == base
    scrambled_answer = torch.where(learned, (full_targets + 1) % tok.vocab_size, full_targets)
    assert loss(scrambled_answer) != pytest.approx(base, rel=1e-3)


def test_packed_examples_compute_exactly_what_each_computes_alone(tok):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tok)
    examples = [sft.encode_example([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   tok, template, max_len=64) for q, a in (("Hi", "yo"), ("Add 2 2", "4"), ("?", "!"))]
    rows = sft.pack_examples(examples, block_size=128, pad_id=tok.eot_id)
    assert len(rows) == 1  # all three fit into one row
    model = tiny_model(vocab_size=tok.vocab_size, block_size=128)
    x, y, positions, mask = sft.packed_batch(rows)
    packed, _ = model(x, positions=positions, mask=mask)
    start = 0
    for e in examples:
        alone, _ = model(torch.tensor([e.inputs]))
        n = len(e.inputs)
        torch.testing.assert_close(packed[0, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
        assert y[0, start:start + n].tolist() == e.targets
        start += n
    assert (y[0, start:] == sft.IGNORE).all()  # padding is never learned


def test_long_examples_are_truncated_and_flagged(tok):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tok)
    messages = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]
    example = sft.encode_example(messages, tok, template, max_len=32)
    assert example.truncated and len(example.inputs) == 32


def test_a_models_own_chat_template_is_used_with_its_special_tokens(tmp_path, tok):
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    own = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": own, "eos_token": "<|im_end|>"}))
    template = ChatTemplate.resolve(None, tmp_path, tok)
    assert template.stop_ids == sorted([tok.eot_id, tok.token_to_id("<|im_end|>")])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}]
    example = sft.encode_example(messages, tok, template, max_len=64)
    assert _learned_text(tok, example) == "yo<|im_end|>"
    assert tok.token_to_id("<|im_start|>") in example.inputs  # one special token, not its characters


def test_bad_records_name_the_problem():
    with pytest.raises(BadRecord, match="expected 'prompt' and 'response'"):
        sft.record_to_messages({"question": "?"}, "prompt", "response", "messages")
    with pytest.raises(BadRecord, match="no assistant message"):
        sft.record_to_messages({"messages": [{"role": "user", "content": "hi"}]}, "prompt", "response", "messages")
    with pytest.raises(BadRecord, match=r"messages\[0\]"):
        sft.record_to_messages({"messages": [{"role": "robot", "content": "hi"}]}, "prompt", "response", "messages")


def test_an_invalid_template_file_is_a_user_error(tmp_path, tok):
    bad = tmp_path / "t.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(UserError, match="not valid Jinja"):
        ChatTemplate.resolve(str(bad), None, tok)
