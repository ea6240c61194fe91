"""Serving an encoder-decoder run: /v1/completions writes a target for each prompt, its source, as
`generate_seq2seq` writes it (greedy, beams, seeded sampling; streamed or not; n and batches of prompts), the
engine's batches end each job on its own (max_tokens, end-of-text, cancelled, a failure), and what an encoder-decoder
cannot do (chat, echo, logprobs, a source past its context, beams with sampling) is an OpenAI-shaped 400."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lmforge.config import ModelConfig, from_dict
from lmforge.data.seq2seq import Seq2SeqTokens
from lmforge.data.tokenizer import Tokenizer
from lmforge.generate_seq2seq import frame_sources, generate_seq2seq
from lmforge.loading import load_run
from lmforge.model import build_model
from lmforge.model.gpt import GPT
from lmforge.runtime import Runtime
from lmforge.serve import seq2seq_engine
from lmforge.serve.app import Served, create_app
from lmforge.serve.engine import Engine, Finished, Job, Token
from lmforge.serve.seq2seq_engine import Seq2SeqEngine
from tests.fixtures import HANG_S, save_seq2seq_run
from tests.serve.conftest import Server, start

BLOCK = 32
SOURCES = ["def main(", "    return ", "class Foo", "# parse the"]
"""With the weights below, 12 tokens greedy: 'M' then end-of-text, twelve commas (no end), two empty targets; beam
search writes another target for the first and the third."""


def write_seq2seq_run(folder: Path) -> Path:
    """A run directory of a tiny encoder-decoder that costs no training and still writes targets that differ by
    source: random weights (std 0.5, so that a block's output outweighs the tied embedding it would copy back), the
    special tokens never written, end-of-text made likely enough that some targets end before max_tokens."""
    tokenizer = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789().,:;#_=\n"])
    tokens = Seq2SeqTokens.of(tokenizer)  # adds [PAD] and [MASK]
    cfg = from_dict(ModelConfig, {"preset": "seq2seq-tiny", "n_embd": 64, "block_size": BLOCK,
                                  "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name != "wte.weight" and "wpe" not in name:
                p.normal_(0, 0.5)
        specials = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).startswith("[")]
        model.lm_head.bias[specials] = -10.0
        model.lm_head.bias[tokens.eos] = 0.2
    return save_seq2seq_run(folder, model, tokenizer)


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory) -> Path:
    return write_seq2seq_run(tmp_path_factory.mktemp("runs") / "s2s")


@pytest.fixture(scope="module")
def s2s(s2s_run):
    srv, holder = start(s2s_run, max_batch=8, max_queue=32)
    srv.served = holder["served"]
    yield srv
    srv.close()


def _alone(run_dir: Path, sources: list[str], max_tokens: int, **kw) -> list[tuple[str, str]]:
    """(text, finish reason) ``generate_seq2seq`` writes for each source, each in a call of its own."""
    run = load_run(run_dir)
    out = []
    for source in sources:
        framed, tokens = frame_sources(run.tokenizer, [source], BLOCK)
        ids = generate_seq2seq(run.model, framed, max_tokens, tokens, **kw)[0]
        out.append((run.tokenizer.decode(ids), "length" if len(ids) == max_tokens else "stop"))
    return out


def _complete(server, run_dir: Path, **body) -> dict:
    code, _h, answer = server.request("POST", "/v1/completions", {"model": run_dir.name, **body})
    assert code == 200, answer
    return answer


def _texts(answer: dict) -> list[tuple[str, str]]:
    return [(c["text"], c["finish_reason"]) for c in sorted(answer["choices"], key=lambda c: c["index"])]


def test_a_completion_is_the_target_generate_seq2seq_writes_for_the_prompt_as_source(s2s, s2s_run):
    expected = _alone(s2s_run, SOURCES, 12, temperature=0)
    assert {reason for _text, reason in expected} == {"stop", "length"} and any(text for text, _r in expected)
    for source, want in zip(SOURCES, expected, strict=True):
        answer = _complete(s2s, s2s_run, prompt=source, max_tokens=12, temperature=0)
        assert _texts(answer) == [want]
        ids = load_run(s2s_run).tokenizer.encode(source)
        assert answer["usage"]["prompt_tokens"] == len(ids)
        assert answer["usage"]["completion_tokens"] == len(want[0])  # one character a token
    streamed = s2s.request("POST", "/v1/completions", {"model": s2s_run.name, "prompt": SOURCES[1], "max_tokens": 12,
                                                       "temperature": 0, "stream": True})[2]
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == expected[1][0]
    assert events[-1]["choices"][0]["finish_reason"] == expected[1][1]
    assert streamed.rstrip().endswith("data: [DONE]")


def test_n_choices_of_a_batch_of_prompts_are_each_what_its_source_gives_alone(s2s, s2s_run):
    expected = _alone(s2s_run, SOURCES, 10, temperature=0)
    answer = _complete(s2s, s2s_run, prompt=SOURCES, n=2, max_tokens=10, temperature=0)
    assert _texts(answer) == [want for want in expected for _ in range(2)]
    assert s2s.served.engine.peak_batch > 1  # they did share a batch
    # Seeded sampling runs alone: choice k is what seed + k gives (and what a request of its own gets).
    seeded = _complete(s2s, s2s_run, prompt=SOURCES[2], n=2, max_tokens=10, temperature=1.0, seed=5)
    assert _texts(seeded) == [_alone(s2s_run, SOURCES[2:3], 10, temperature=1.0, seed=seed)[0] for seed in (5, 6)]


def test_beam_search_is_generate_seq2seq_s_and_the_official_client_asks_for_it(s2s, s2s_run):
    openai = pytest.importorskip("openai")
    beams = _alone(s2s_run, SOURCES, 12, temperature=0, beams=2)
    assert beams != _alone(s2s_run, SOURCES, 12, temperature=0)  # the search changes something
    answer = _complete(s2s, s2s_run, prompt=SOURCES, max_tokens=12, temperature=0, beams=2)
    assert _texts(answer) == beams
    client = openai.OpenAI(base_url=f"{s2s.url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model=s2s_run.name, prompt=SOURCES[2], max_tokens=12, temperature=0,
                                     extra_body={"beams": 2, "length_penalty": 1.0})
    assert (done.choices[0].text, done.choices[0].finish_reason) == beams[2]


BAD = [  # (what is sent, param, words of the message)
    ({"echo": True}, "echo", "decoder-only"),
    ({"logprobs": 1}, "logprobs", "decoder-only"),
    ({"beams": 0}, "beams", "'beams': expected an integer of at least 1, got 0"),
    ({"beams": 2, "temperature": 0.7}, "beams", "'beams': beam search keeps the likeliest outputs"),
    ({"beams": 99, "temperature": 0}, "beams", "16"),
    ({"beams": "2", "temperature": 0}, "beams", "'beams'"),
    ({"length_penalty": "long"}, "length_penalty", "'length_penalty'"),
    ({"prompt": "x" * BLOCK}, "prompt", f"encoder reads {BLOCK} tokens: a source of at most {BLOCK - 1}"),
    ({"max_tokens": BLOCK + 1}, "max_tokens", f"writes at most {BLOCK} tokens"),
]


def test_what_an_encoder_decoder_cannot_do_is_an_openai_400_and_the_rest_keeps_working(s2s, s2s_run):
    for sent, param, words in BAD:
        code, _h, answer = s2s.request("POST", "/v1/completions", {"model": s2s_run.name, "prompt": "a",
                                                                   "max_tokens": 2, **sent})
        assert (code, answer["error"]["param"], answer["error"]["type"]) == (400, param, "invalid_request_error"), sent
        assert words in answer["error"]["message"], answer
    code, _h, answer = s2s.request("POST", "/v1/chat/completions", {"model": s2s_run.name, "max_tokens": 2,
                                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert "decoder-only (chat-tuned)" in answer["error"]["message"]
    assert "/v1/completions" in answer["error"]["message"]
    assert s2s.request("GET", "/health")[0] == 200
    assert s2s.request("GET", "/v1/models")[2]["data"][0]["context_length"] == BLOCK
    assert s2s.request("GET", "/tokenizer_info")[2]["chat_template"] is None
    tokens = s2s.request("POST", "/tokenize", {"prompt": "abc"})[2]["tokens"]
    assert s2s.request("POST", "/detokenize", {"tokens": tokens})[2]["prompt"] == "abc"
    assert s2s.request("GET", "/")[0] == 200
    assert _complete(s2s, s2s_run, prompt="x" * (BLOCK - 1), max_tokens=2)["choices"][0]["finish_reason"]


def test_beams_on_a_decoder_only_model_is_a_400_naming_beams():
    tokenizer = Tokenizer.train_char(["abcdefg"])
    torch.manual_seed(0)
    model = GPT(from_dict(ModelConfig, {"preset": "gpt2-tiny", "vocab_size": tokenizer.vocab_size, "n_layer": 1,
                                        "block_size": 32})).eval()
    engine = Engine(model, Runtime(torch.device("cpu"), "fp32"), max_batch=2, max_queue=4)
    server = Server(create_app(lambda: Served("toy", tokenizer, ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokenizer),
                                              engine, 32)))
    try:
        server.wait_ready()
        code, _h, answer = server.request("POST", "/v1/completions", {"model": "toy", "prompt": "abc", "beams": 2,
                                                                      "temperature": 0, "max_tokens": 2})
        assert (code, answer["error"]["param"]) == (400, "beams") and "encoder-decoder" in answer["error"]["message"]
        code, _h, _answer = server.request("POST", "/v1/completions", {"model": "toy", "prompt": "abc", "beams": 1,
                                                                       "max_tokens": 2})
        assert code == 200
    finally:
        server.close()


def _engine(run_dir: Path, **kw) -> tuple[Seq2SeqEngine, Tokenizer]:
    run = load_run(run_dir)
    return Seq2SeqEngine(run.model, Runtime(torch.device("cpu"), "fp32"), Seq2SeqTokens.of(run.tokenizer), **kw), \
        run.tokenizer


def _job(tokenizer: Tokenizer, source: str, max_tokens: int, events: list, done: threading.Event, **kw) -> Job:
    framed, _tokens = frame_sources(tokenizer, [source], BLOCK)

    def emit(event: Token | Finished) -> None:
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    return Job(framed[0], max_tokens, emit, stop_ids=frozenset({tokenizer.eot_id}), **kw)


def test_a_job_cancelled_in_a_batch_ends_alone_and_a_failed_batch_leaves_the_engine_serving(s2s_run, monkeypatch):
    from lmforge.options import GREEDY

    engine, tokenizer = _engine(s2s_run, max_batch=4)
    (text, reason), = _alone(s2s_run, SOURCES[1:2], 12, temperature=0)
    cancelled, kept, ends = [], [], [threading.Event(), threading.Event()]
    quitter = _job(tokenizer, SOURCES[1], 12, cancelled, ends[0], sampling=GREEDY)
    quitter.emit = lambda event, emit=quitter.emit: (emit(event), quitter.cancel())  # leaves at its first token
    engine.submit(quitter)
    engine.submit(_job(tokenizer, SOURCES[1], 12, kept, ends[1], sampling=GREEDY))
    engine.start()
    try:
        assert all(end.wait(HANG_S) for end in ends)
        assert [type(e) for e in cancelled] == [Token, Finished] and cancelled[-1].reason == "cancelled"
        assert tokenizer.decode([e.id for e in kept[:-1]]) == text and kept[-1].reason == reason
        assert engine.peak_batch == 2 and not engine.rows

        def boom(*_a, **_kw):
            raise RuntimeError("an injected fault")

        failed, end = [], threading.Event()
        monkeypatch.setattr(seq2seq_engine, "generate_seq2seq", boom)
        engine.submit(_job(tokenizer, SOURCES[0], 4, failed, end, sampling=GREEDY))
        assert end.wait(HANG_S) and failed[-1].reason == "error" and "injected" in failed[-1].error
        monkeypatch.undo()
        again, end = [], threading.Event()
        engine.submit(_job(tokenizer, SOURCES[0], 4, again, end, sampling=GREEDY))
        assert end.wait(HANG_S) and again[-1].reason in ("stop", "length") and engine.failure is None
    finally:
        engine.stop()
