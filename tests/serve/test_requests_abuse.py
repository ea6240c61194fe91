"""One request never takes the server down: values the engine cannot take are refused up front (400 naming the
field), a failure inside the engine fails its own request only (500) and the engine goes on, a dead engine is said
by /health and fails requests at once, bodies are bounded (413) and must be JSON text (400), and long prompts are
tokenized off the event loop. Each abusive request is followed by a normal one that must be answered."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lmforge.config import ModelConfig, from_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.model.gpt import GPT
from lmforge.runtime import Runtime
from lmforge.serve.app import MAX_STOP_CHARS, Served, create_app
from lmforge.serve.engine import Engine, Finished, Job
from lmforge.serve.guard import MAX_BODY_BYTES
from tests.fixtures import HANG_S
from tests.serve.conftest import Server

openai = pytest.importorskip("openai")

ANSWERED_S = 10
"""Client timeout of every request here (but one held on purpose), the normal one after each abusive one above all.
The acceptance is "answered within 1 s" on a quiet machine; the tests run on a loaded 2-core host, so they ask that
it is answered at all within a generous bound: a server stuck behind an abusive request never answers."""


def _call(server: Server, method: str, path: str, body: bytes | dict | None = None,
          headers: dict[str, str] | None = None, timeout: float = ANSWERED_S) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except json.JSONDecodeError:
        return resp.status, raw


def still_serving(server: Server, name: str) -> None:
    """A normal completion is answered (see ANSWERED_S) and /health is 200."""
    code, answer = _call(server, "POST", "/v1/completions", {"model": name, "prompt": "a", "max_tokens": 2})
    assert code == 200 and answer["choices"][0]["finish_reason"], answer
    assert _call(server, "GET", "/health")[0] == 200


def wait_for(condition, timeout: float = HANG_S) -> bool:
    """Whether ``condition()`` became true within ``timeout`` (polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _error(answer: dict, status: int, got: int, param: str | None) -> None:
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert answer["error"]["param"] == param and answer["error"]["message"], answer


# --- on the trained run (tests/serve/conftest.py's server) --------------------------------------------------------

def test_seeds_outside_64_bits_are_400_and_seed_plus_n_wraps_around(server, run_dir):
    body = {"model": run_dir.name, "prompt": "def ", "max_tokens": 4, "temperature": 1.0}
    for seed in (2 ** 64, -(2 ** 63) - 1, 10 ** 40):
        code, answer = _call(server, "POST", "/v1/completions", {**body, "seed": seed})
        _error(answer, 400, code, "seed")
        still_serving(server, run_dir.name)
    code, top = _call(server, "POST", "/v1/completions", {**body, "seed": 2 ** 64 - 1, "n": 2})
    assert code == 200, top
    code, zero = _call(server, "POST", "/v1/completions", {**body, "seed": 0})
    assert top["choices"][1]["text"] == zero["choices"][0]["text"]  # seed 2**64 - 1 + 1 is seed 0
    still_serving(server, run_dir.name)


def test_a_stop_string_longer_than_the_limit_is_400_and_one_at_the_limit_is_watched(server, run_dir):
    body = {"model": run_dir.name, "prompt": "def ", "max_tokens": 20, "temperature": 0}
    code, answer = _call(server, "POST", "/v1/completions", {**body, "stop": ["x", "y" * (MAX_STOP_CHARS + 1)]})
    _error(answer, 400, code, "stop")
    still_serving(server, run_dir.name)
    full = _call(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    # The longest stop string allowed, ending in the answer's 5th-7th characters: the text is cut before them.
    stop = "\x00" * (MAX_STOP_CHARS - 3) + full[4:7]
    code, answer = _call(server, "POST", "/v1/completions", {**body, "stop": [stop, full[4:7]]})
    assert code == 200 and answer["choices"][0]["text"] == full[:full.index(full[4:7])]


NOT_JSON = [("text/plain", b'{"model": "m", "prompt": "a"}'), ("application/x-www-form-urlencoded", b"prompt=a"),
            ("multipart/form-data; boundary=x", b"--x--")]


@pytest.mark.parametrize(("content_type", "body"), NOT_JSON)
def test_a_body_that_is_not_json_is_400(server, run_dir, content_type, body):
    code, answer = _call(server, "POST", "/v1/completions", body, {"Content-Type": content_type})
    _error(answer, 400, code, "Content-Type")
    still_serving(server, run_dir.name)


def test_invalid_utf8_and_bodies_python_cannot_parse_are_400(server, run_dir):
    for body in (b'{"model": "m", "prompt": "\xed\xa0\x80"}',  # a surrogate written in UTF-8's form: not UTF-8
                 b'{"prompt": ' + b"[" * 100_000 + b'"\\ud800"' + b"]" * 100_000 + b"}"):  # nested past recursion
        code, answer = _call(server, "POST", "/v1/completions", body)
        _error(answer, 400, code, None)
        still_serving(server, run_dir.name)


LONE = "\ud800"  # valid in JSON ("\\ud800"), but no character: nothing can encode it


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": f"a{LONE}"}, "prompt"),
    ("/v1/completions", {"prompt": ["a", f"{LONE}b"]}, "prompt.1"),
    ("/v1/completions", {"prompt": "a", "stop": [LONE]}, "stop.0"),
    ("/v1/completions", {"prompt": "a", "model": LONE}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {LONE}"}]}, "messages.0.content"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
])
def test_a_lone_surrogate_in_any_text_field_is_400_naming_it(server, run_dir, path, body, param):
    sent = json.dumps({"model": run_dir.name, "max_tokens": 2, **body}).encode()  # ensure_ascii: "\ud800"
    code, answer = _call(server, "POST", path, sent)
    _error(answer, 400, code, param)
    still_serving(server, run_dir.name)
    # A surrogate pair is one character, and welcome.
    code, _answer = _call(server, "POST", "/tokenize", json.dumps({"prompt": "\U0001f600"}).encode())
    assert code == 200


def test_a_body_over_the_limit_is_413_before_it_is_read(server, run_dir):
    # Content-Length says too much: the answer comes though not one byte of the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=ANSWERED_S) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {50 * MAX_BODY_BYTES}\r\n\r\n".encode())
        status, answer = _response(sock)
    _error(answer, 413, status, None)
    # No Content-Length (chunked): refused once the bytes received pass the limit, the rest never read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=ANSWERED_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(MAX_BODY_BYTES // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, answer = _response(sock)
    _error(answer, 413, status, None)
    still_serving(server, run_dir.name)


def _response(sock: socket.socket) -> tuple[int, dict]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, json.loads(resp.read())


def test_prompts_are_tokenized_off_the_event_loop(server, run_dir, monkeypatch):
    """A long prompt held in tokenization (here: until the test lets it go) stalls no other client."""
    entered, release = threading.Event(), threading.Event()
    encode = Tokenizer.encode_batch

    def held(tokenizer, texts, allow_special=False):
        if any(len(t) > 1000 for t in texts):
            entered.set()
            release.wait(HANG_S)
        return encode(tokenizer, texts, allow_special)

    monkeypatch.setattr(Tokenizer, "encode_batch", held)
    long = "x" * 100_000
    bodies = [("/v1/completions", {"model": run_dir.name, "prompt": long}),
              ("/v1/chat/completions", {"model": run_dir.name, "messages": [{"role": "user", "content": long}]}),
              ("/tokenize", {"prompt": long})]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for path, body in bodies:
            entered.clear()
            release.clear()
            answer = pool.submit(_call, server, "POST", path, body, timeout=HANG_S)  # held by the test meanwhile
            try:
                assert entered.wait(HANG_S)
                still_serving(server, run_dir.name)  # while the long prompt is still being tokenized
            finally:
                release.set()
            code, _answer = answer.result(HANG_S)
            assert code == (200 if path == "/tokenize" else 400), path  # 400: longer than the context


# --- on a toy model with a vocabulary of 8, whose step fails when a test says so ---------------------------------

class Faulty:
    """The engine's model step, raising for the calls ``fails`` picks: a bug in the engine, on demand."""

    def __init__(self, model: GPT):
        self.model = model
        self.fails = lambda _ids, _kw: False

    def __call__(self, ids: torch.Tensor, **kw):
        if self.fails(ids, kw):
            raise RuntimeError("an injected fault")
        return self.model(ids, **kw)


def _toy() -> tuple[Server, Served, Faulty]:
    tokenizer = Tokenizer.train_char(["abcdefg"])
    torch.manual_seed(0)
    model = GPT(from_dict(ModelConfig, {"preset": "gpt2-tiny", "vocab_size": tokenizer.vocab_size, "n_layer": 1,
                                        "block_size": 64})).eval()
    faulty = Faulty(model)
    engine = Engine(model, Runtime(torch.device("cpu"), "fp32"), max_batch=4, max_queue=8, step_model=faulty)
    served = Served("toy", tokenizer, ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokenizer), engine, 64)
    server = Server(create_app(lambda: served))
    server.wait_ready()
    return server, served, faulty


@pytest.fixture(scope="module")
def toy():
    server, served, faulty = _toy()
    yield server, served, faulty
    server.close()


def test_logprobs_beyond_the_vocabulary_is_400(toy):
    server, served, _faulty = toy
    assert served.engine.model.cfg.vocab_size < 20
    for extra in ({"max_tokens": 2}, {"max_tokens": 0, "echo": True}):
        code, answer = _call(server, "POST", "/v1/completions", {"model": "toy", "prompt": "abc", "logprobs": 20,
                                                                 **extra})
        _error(answer, 400, code, "logprobs")
        still_serving(server, "toy")


def test_more_answers_than_the_queue_holds_is_400_not_a_429_to_retry_for_ever(toy):
    server, served, _faulty = toy
    many = served.engine.max_queue // 2 + 1
    code, answer = _call(server, "POST", "/v1/completions", {"model": "toy", "prompt": [[1]] * many, "n": 2})
    _error(answer, 400, code, "prompt")
    still_serving(server, "toy")


def test_a_failure_in_the_engine_fails_its_own_request_only(toy):
    server, served, faulty = toy
    poison = 7  # the prefill of any prompt holding this token id fails
    held = threading.Event()

    def fails(ids: torch.Tensor, kw: dict) -> bool:
        if isinstance(kw["cache_start"], int):  # a prefill
            return bool((ids == poison).any())
        if not held.is_set():  # the running request's first decode step waits for the failing one to be queued
            held.set()
            assert wait_for(lambda: served.engine.waiting)
        return False

    faulty.fails = fails
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=HANG_S)
        stream = client.completions.create(model="toy", prompt="abc", max_tokens=40, stream=True, temperature=0)
        first = next(iter(stream))  # a request is running...
        code, answer = _call(server, "POST", "/v1/completions", {"model": "toy", "prompt": [1, poison],
                                                                 "max_tokens": 4})
        assert code == 500 and answer["error"]["type"] == "server_error", answer  # ...when another one fails,
        assert "an injected fault" in answer["error"]["message"]
        rest = list(stream)  # and the running one goes on to its end
        assert held.is_set() and first.choices[0].text and rest[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.APIError, match="an injected fault"):  # streamed: an error event, which it raises
            list(client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "g"}],
                                                max_tokens=4, stream=True))
        still_serving(server, "toy")
        # A batched decode step fails: the requests in it fail, the engine takes the next ones.
        faulty.fails = lambda ids, kw: not isinstance(kw["cache_start"], int)
        code, answer = _call(server, "POST", "/v1/completions",  # greedy, as above: no end-of-text before a step
                             {"model": "toy", "prompt": "abc", "max_tokens": 4, "temperature": 0})
        assert code == 500 and "an injected fault" in answer["error"]["message"]
    finally:
        faulty.fails = lambda _ids, _kw: False
    still_serving(server, "toy")


def test_a_job_whose_sampling_fails_ends_alone_and_the_engine_goes_on(toy):
    _server, served, _faulty = toy
    events: dict[str, list] = {"bad": [], "good": []}
    done = {name: threading.Event() for name in events}

    def emit(name: str):
        def put(event):
            events[name].append(event)
            if isinstance(event, Finished):
                done[name].set()
        return put

    served.engine.submit(Job([1, 2], 3, emit("bad"), logprobs=50))  # past validation: top-50 of 8 tokens fails
    served.engine.submit(Job([1, 2], 3, emit("good")))
    assert done["bad"].wait(HANG_S) and done["good"].wait(HANG_S)
    assert events["bad"][-1].reason == "error" and events["bad"][-1].error
    assert events["good"][-1].reason == "length" and len(events["good"]) == 4


def test_a_dead_engine_is_said_by_health_and_fails_requests_at_once(monkeypatch):
    server, served, _faulty = _toy()
    try:
        def boom() -> None:
            raise RuntimeError("a bug outside any request")

        monkeypatch.setattr(served.engine, "_admit", boom)  # not guarded: the engine thread dies of it
        # The request in flight when it died ends, with the reason.
        code, answer = _call(server, "POST", "/v1/completions", {"model": "toy", "prompt": "ab", "max_tokens": 4})
        assert code == 500 and "a bug outside any request" in answer["error"]["message"], answer
        code, health = _call(server, "GET", "/health")
        assert code == 503 and "a bug outside any request" in health["error"]
        code, answer = _call(server, "POST", "/v1/completions", {"model": "toy", "prompt": "ab", "max_tokens": 4})
        assert code == 503 and answer["error"]["code"] == "engine_failed"
    finally:
        server.close()  # what SIGTERM does (uvicorn's handler sets should_exit): it must stop the server
    assert not server.thread.is_alive()
