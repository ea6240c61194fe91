"""The OpenAI-compatible server: the official client, greedy output equal to `generate`, streaming, logprobs,
continuous batching, and an OpenAI-shaped answer to every bad request."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import threading
import time

import pytest
import torch

from lmforge.evaluate.tasks import loglikelihoods
from lmforge.generate import generate_text
from lmforge.loading import load_run
from lmforge.options import GREEDY, Sampling
from lmforge.runtime import Runtime
from lmforge.serve.engine import Engine, Job, QueueFull
from tests.fixtures import HANG_S
from tests.serve.conftest import start

openai = pytest.importorskip("openai")
PROMPTS = ["def main(", "import os\n", "class Foo", "    return ", "# parse the", "if __name__"]


def _client(server, key: str = "unused"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_the_official_client_lists_completes_chats_and_streams(server):
    client = _client(server)
    name = client.models.list().data[0].id
    done = client.completions.create(model=name, prompt="def main(", max_tokens=12, temperature=0)
    assert len(done.choices[0].text) > 0 and done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 9
    assert done.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=10,
                                          temperature=0)
    answer = chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer and len(answer) > 0
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_greedy_output_is_what_generate_gives_whatever_else_is_in_the_batch(server, run_dir):
    run = load_run(run_dir)
    alone = [generate_text(run.model, run.tokenizer, [p], 30, GREEDY)[0] for p in PROMPTS]
    client = _client(server)

    def complete(prompt: str) -> str:
        return client.completions.create(model=run_dir.name, prompt=prompt, max_tokens=30, temperature=0,
                                         stop=None).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2) as pool:  # 12 at once in a batch of 8
        together = list(pool.map(complete, PROMPTS * 2))
    assert together == alone * 2
    assert server.served.engine.peak_batch > 1  # they did share the batch


def test_a_repetition_penalty_is_applied_as_generate_applies_it(server, run_dir):
    run = load_run(run_dir)
    plain, penalized = (generate_text(run.model, run.tokenizer, ["def main("], 30, sampling)[0]
                        for sampling in (GREEDY, Sampling(temperature=0.0, repetition_penalty=2.0)))
    answer = _client(server).completions.create(model=run_dir.name, prompt="def main(", max_tokens=30, temperature=0,
                                                 extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert answer == penalized != plain


def test_seeded_sampling_repeats_and_n_choices_differ(server, run_dir):
    client = _client(server)
    args = {"model": run_dir.name, "prompt": "def ", "max_tokens": 20, "temperature": 1.0, "seed": 7}
    a, b = client.completions.create(**args), client.completions.create(**args)
    assert a.choices[0].text == b.choices[0].text
    many = client.completions.create(**args, n=3)
    assert len({c.text for c in many.choices}) > 1 and many.choices[0].text == a.choices[0].text


def test_stop_strings_cut_the_text_and_free_the_row(server, run_dir):
    client = _client(server)
    full = client.completions.create(model=run_dir.name, prompt="def main(", max_tokens=30, temperature=0)
    stop = full.choices[0].text[5:8]
    cut = client.completions.create(model=run_dir.name, prompt="def main(", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_echoed_logprobs_equal_the_evaluators_log_likelihoods(server, run_dir):
    run = load_run(run_dir)
    context, continuation = "import json\n", "def dumps(obj"
    ctx, cont = run.tokenizer.encode(context), run.tokenizer.encode(continuation)
    expected = loglikelihoods(run.model, [(ctx, cont)])[0][0]
    out = _client(server).completions.create(model=run_dir.name, prompt=ctx + cont, max_tokens=0, echo=True,
                                             logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ctx) + len(cont)
    assert abs(sum(lp.token_logprobs[len(ctx):]) - expected) <= 1e-4
    assert out.choices[0].text == context + continuation


def test_a_client_that_disconnects_frees_its_row(server, run_dir):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_S)
    body = {"model": run_dir.name, "prompt": "def ", "max_tokens": 60, "stream": True, "temperature": 1}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.fp.readline()  # the first event arrived: the job is running
    conn.sock.close()
    deadline = time.monotonic() + HANG_S
    while server.served.engine.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.served.engine.rows


def _completion(name: str, **kw) -> dict:
    return {"model": name, "prompt": "def ", "max_tokens": 4, **kw}


BAD = [  # (what is sent, status, error type, param)
    (b"{not json", 400, "invalid_request_error", None),
    ({"max_tokens": "5"}, 400, "invalid_request_error", "max_tokens"),
    ({"temperature": -0.5}, 400, "invalid_request_error", "temperature"),
    ({"top_p": 0}, 400, "invalid_request_error", "top_p"),
    ({"top_p": 1.5}, 400, "invalid_request_error", "top_p"),
    ({"top_k": 0}, 400, "invalid_request_error", "top_k"),
    ({"repetition_penalty": 0}, 400, "invalid_request_error", "repetition_penalty"),
    ({"temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    ({"prompt": ""}, 400, "invalid_request_error", "prompt"),
    ({"prompt": []}, 400, "invalid_request_error", "prompt"),
    ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": -3}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 1000}, 400, "invalid_request_error", "max_tokens"),
    ({"prompt": "x" * 60, "max_tokens": 10}, 400, "invalid_request_error", "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error", "stop"),
    ({"model": "gpt-4"}, 404, "invalid_request_error", "model"),
    ({"n": "two"}, 400, "invalid_request_error", "n"),
    ({"stream": True, "echo": True}, 400, "invalid_request_error", "stream"),
]


def test_every_bad_request_is_an_openai_error_naming_the_field_and_the_server_keeps_answering(server, run_dir):
    for sent, status, kind, param in BAD:
        body = sent if isinstance(sent, bytes) else _completion(run_dir.name, **sent)
        code, _headers, answer = server.request("POST", "/v1/completions", body)
        assert (code, answer["error"]["type"], answer["error"]["param"]) == (status, kind, param), (sent, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    code, _h, answer = server.request("POST", "/v1/chat/completions", {"model": run_dir.name, "messages": []})
    assert (code, answer["error"]["param"]) == (400, "messages")
    code, _h, answer = server.request("POST", "/v1/completions", _completion(run_dir.name, prompt="x" * 60,
                                                                              max_tokens=10))
    assert "context is 64 tokens: the prompt has 60 and max_tokens asks for 10 more (70)" in answer["error"]["message"]
    code, _h, answer = server.request("POST", "/v1/completions", _completion(run_dir.name))
    assert code == 200 and answer["choices"][0]["text"]


def test_a_full_queue_is_429_with_retry_after(server, run_dir):
    engine = server.served.engine
    engine.stop()  # nothing is admitted: requests wait in the queue
    try:
        body = _completion(run_dir.name)
        waiting = [threading.Thread(target=server.request, args=("POST", "/v1/completions", body))
                   for _ in range(engine.max_queue)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + HANG_S
        while len(engine.waiting) < engine.max_queue and time.monotonic() < deadline:
            time.sleep(0.02)
        code, headers, answer = server.request("POST", "/v1/completions", body)
        assert code == 429 and answer["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
    finally:
        engine.start()
    for t in waiting:
        t.join(timeout=HANG_S)
    assert server.request("POST", "/v1/completions", _completion(run_dir.name))[0] == 200


def test_an_api_key_is_required_when_set(run_dir):
    srv, _ = start(run_dir, api_key="sesame")
    try:
        assert srv.request("GET", "/v1/models")[0] == 401
        code, _h, answer = srv.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        assert _client(srv, "sesame").models.list().data[0].id == run_dir.name
        assert srv.request("GET", "/health")[0] == 200
    finally:
        srv.close()


def test_health_is_503_until_the_model_is_loaded(run_dir):
    from lmforge.serve.app import create_app, load_served
    from lmforge.serve.options import ServeOptions
    from tests.serve.conftest import Server

    release = threading.Event()

    def slow_load():
        release.wait(HANG_S)  # released by the test (or its finally) once it has seen the 503s
        return load_served(ServeOptions(str(run_dir), device="cpu", precision="fp32"))

    srv = Server(create_app(slow_load))
    try:
        assert srv.request("GET", "/health")[0] == 503
        code, _h, answer = srv.request("POST", "/v1/completions", _completion(run_dir.name))
        assert code == 503 and answer["error"]["code"] == "loading"
        release.set()
        srv.wait_ready()
    finally:
        release.set()
        srv.close()


def test_the_engine_refuses_past_max_queue_and_frees_rows_that_finish(run_dir):
    run = load_run(run_dir)
    engine = Engine(run.model, Runtime(torch.device("cpu"), "fp32"), max_batch=2, max_queue=1)
    engine.submit(Job([1, 2, 3], 4, emit=lambda _e: None))
    with pytest.raises(QueueFull):
        engine.submit(Job([1, 2, 3], 4, emit=lambda _e: None))


def test_lm_eval_local_completions_scores_a_task_through_the_server(server, run_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmforge.examples import HARNESS_TASK

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Contexts without trailing whitespace: lm-eval moves it into the continuation, lmforge eval does not.
    items = [{"context": "import json", "choices": ["\ndef dumps", "zq!xv"], "label": 0},
             {"context": "        return", "choices": [" self", "QQQQ"], "label": 0},
             {"context": "class JSON", "choices": ["Decoder", "9;9;9"], "label": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "serve_mc.yaml").write_text(HARNESS_TASK.format(name="serve_mc", mc=tmp_path / "mc.jsonl"))
    out = simple_evaluate(model="local-completions",
                          model_args=f"model={run_dir.name},base_url={server.url}/v1/completions,"
                                     f"tokenizer_backend=remote,num_concurrent=2,max_retries=1",
                          tasks=["serve_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    run = load_run(run_dir)
    right = 0
    for sample in out["samples"]["serve_mc"]:
        doc = sample["doc"]
        ours = [ll for ll, _ in loglikelihoods(run.model, [(run.tokenizer.encode(doc["context"]),
                                                            run.tokenizer.encode(c)) for c in doc["choices"]])]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(ours, abs=1e-4)
        right += ours.index(max(ours)) == doc["label"]
    assert out["results"]["serve_mc"]["acc,none"] == pytest.approx(right / len(items))
