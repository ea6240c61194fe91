"""``lmforge serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent
events ending with ``data: [DONE]``), ``GET /health`` (503 until the model is loaded) and the chat page at ``/``.
Every error has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: a malformed or mistyped body
is 400 naming the field (not FastAPI's 422), a prompt that does not fit the context 400 with the token counts,
an unknown model 404, a missing or wrong key 401 (with ``--api-key``), a ``Host`` the server does not answer to
400 (against DNS rebinding: :mod:`lmforge.serve.security`), a body over 1 MiB 413, a full queue 429 with
``Retry-After``, a failure inside the engine 500 with its message (for that request only), a dead engine 503.

An encoder-decoder run (``model.arch=encoder_decoder``) is served by
:class:`~lmforge.serve.seq2seq_engine.Seq2SeqEngine`: ``/v1/completions`` writes a target for each prompt, its source
(with the extension fields ``beams`` and ``length_penalty`` for beam search, as ``lmforge generate --beams``); chat,
``echo`` and ``logprobs`` are 400 there, and so is a source past the encoder's context.

No request holds the event loop for long: prompts are tokenized on worker threads (without the GIL), stop strings
are watched in time linear in their length, and their length is bounded (:data:`MAX_STOP_CHARS`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.chat import ChatTemplate
from lmforge.data.records import BadRecord
from lmforge.data.seq2seq import Seq2SeqTokens, frame_source
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate import TextStream
from lmforge.inference import decode_setup
from lmforge.loading import load_writer, run_template
from lmforge.options import BEAMLESS, OptionError, Sampling, Search
from lmforge.runtime import compile_falls_back_to_eager, maybe_compile, setup_runtime
from lmforge.serve import security
from lmforge.serve.engine import Engine, EngineDown, Finished, Job, JobQueue, QueueFull, Token
from lmforge.serve.errors import APIError
from lmforge.serve.guard import RequestGuard
from lmforge.serve.options import ServeOptions
from lmforge.serve.seq2seq_engine import Seq2SeqEngine

STATIC = Path(__file__).parent / "static"
MAX_STOP = 4
"""Stop strings a request may give (OpenAI's limit)."""
MAX_STOP_CHARS = 256
"""The longest stop string accepted, in characters (stop strings are matched against the text at every token)."""
SEEDS = 2 ** 64
"""Seeds are 64-bit: what ``torch.Generator.manual_seed`` takes is [-2**63, 2**64)."""
MAX_BEAMS = 16
"""The most beams a request may ask for: each is a decoder row for the whole answer (as many as ``n`` may ask)."""


# --- request bodies (strict: "5" is not a number) ------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # fields other clients send (user, ...) are ignored


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields every generation request has; its sampling settings are checked as a :class:`Sampling`."""

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    """Not OpenAI's, but vLLM's and lmforge's: > 1 makes tokens already in the text less likely."""
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-SEEDS // 2, lt=SEEDS)] | None = None
    """Choice k of ``n`` is sampled with seed + k (past 2**64 - 1, from 0 again)."""
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self) -> Sampling:
        """The request's sampling settings; 400 naming the field whose value cannot work."""
        try:
            return Sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)
        except OptionError as e:
            raise _option_error(e) from None


def _option_error(e: OptionError) -> APIError:
    """A 400 naming the body's field whose value cannot work, in the options' own words."""
    return APIError(400, f"'{e.name}': {e.problem}", param=e.name)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    beams: Annotated[int, Field(le=MAX_BEAMS)] = 1
    """Not OpenAI's, but ``lmforge generate --beams``: beam search (encoder-decoder models, temperature 0)."""
    length_penalty: float = 1.0
    """With beams: a finished output scores its summed log-probabilities / its length ** this."""

    def search(self, sampling: Sampling) -> Search:
        """The request's beam search; 400 naming ``beams`` or ``length_penalty`` when it cannot work."""
        try:
            search = Search(self.beams, self.length_penalty)
            search.check_sampling(sampling)
        except OptionError as e:
            raise _option_error(e) from None
        return search


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message]


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# --- the served model ---------------------------------------------------------------------------------

@dataclass
class Served:
    name: str
    tokenizer: Tokenizer
    template: ChatTemplate | None
    """The chat template (None for an encoder-decoder, which does not chat)."""
    engine: JobQueue
    context: int
    task: str = "lm"
    """'lm' (a decoder-only model, :class:`Engine`) or 'seq2seq' (an encoder-decoder, :class:`Seq2SeqEngine`):
    :func:`lmforge.loading.load_writer`'s task."""


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: list[Token] | None = None
    completion_tokens: int = 0


def _submit(engine: Engine, jobs: list[Job]) -> dict[int, asyncio.Queue]:
    """Queue the jobs of one request (all or none: 429 when the queue is full); id(job) -> the queue its events
    arrive in from the engine thread."""
    loop = asyncio.get_running_loop()
    queues: dict[int, asyncio.Queue] = {}
    for job in jobs:
        queue: asyncio.Queue = asyncio.Queue()
        job.emit = lambda event, q=queue: loop.call_soon_threadsafe(q.put_nowait, event)
        queues[id(job)] = queue
    for k, job in enumerate(jobs):
        try:
            engine.submit(job)
        except (QueueFull, EngineDown) as e:
            for queued in jobs[:k]:
                queued.cancel()
            if isinstance(e, EngineDown):
                raise _engine_down(str(e)) from None
            raise APIError(429, f"the server is busy: {engine.max_queue} requests are already waiting "
                                f"(--max-queue); try again shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
    return queues


def _engine_down(why: str) -> APIError:
    return APIError(503, f"{why}; this server cannot generate any more: restart it", type="server_error",
                    code="engine_failed")


async def _events(engine: Engine, queue: asyncio.Queue, job: Job, request: Request
                  ) -> AsyncIterator[Token | Finished]:
    """A job's events as they come from the engine thread; the job is cancelled if the client goes away, and ends
    with an error should the engine die without a word for it."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                if engine.failure is not None and queue.empty():
                    yield Finished("error", engine.failure)
                    return
                continue
            yield event
            if isinstance(event, Finished):
                return
    finally:
        job.cancel()  # a no-op for a finished job; frees the row of one whose client left


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP}", param="stop")
    longest = max(stops, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise APIError(400, f"'stop' holds a string of {len(longest)} characters; at most {MAX_STOP_CHARS}",
                       param="stop")
    return [s for s in stops if s]


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{served.name}' "
                            f"(GET /v1/models)", param="model", code="model_not_found")


def _fit(served: Served, prompt: list[int], max_tokens: int | None, param: str) -> int:
    """max_tokens for ``prompt``: as asked, or all the context leaves; 400 with the counts when it does not fit."""
    if not prompt:
        raise APIError(400, f"'{param}' is empty: give at least one token", param=param)
    room = served.context - len(prompt)
    if max_tokens is None:
        if room < 1:
            raise APIError(400, f"this model's context is {served.context} tokens and the prompt has {len(prompt)}: "
                                f"no room for an answer", param=param, code="context_length_exceeded")
        return room
    if len(prompt) + max_tokens > served.context:
        raise APIError(400, f"this model's context is {served.context} tokens: the prompt has {len(prompt)} and "
                            f"max_tokens asks for {max_tokens} more ({len(prompt) + max_tokens})",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _fit_source(served: Served, source: list[int], max_tokens: int | None) -> int:
    """max_tokens for an encoder-decoder's ``source``: as asked, or all the decoder's context; 400 with the counts
    when the source or the answer does not fit.

    A source past the encoder's context is refused, not cut as ``lmforge generate`` cuts it: as for a decoder's
    prompt past the context, an answer to a text other than the one sent would come with no word of it (an API
    has nowhere to put the command's warning); a client that wants the beginning can send it."""
    if not source:
        raise APIError(400, "'prompt' is empty: give at least one token", param="prompt")
    if len(source) > served.context - 1:
        raise APIError(400, f"this model's encoder reads {served.context} tokens: a source of at most "
                            f"{served.context - 1} and its end-of-text; the prompt has {len(source)}", param="prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        return served.context
    if max_tokens > served.context:
        raise APIError(400, f"this model's decoder writes at most {served.context} tokens (its context); max_tokens "
                            f"asks for {max_tokens}", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _jobs(req: _Sampling, sampling: Sampling, prompt: list[int], max_tokens: int, stop_ids: frozenset[int],
          logprobs: int | None, first_index: int, search: Search = BEAMLESS) -> list[tuple[int, Job]]:
    """``req.n`` jobs for one prompt (seeded seed, seed + 1, ... when a seed is given)."""
    seeds: list[int | None] = [None] * req.n if sampling.seed is None else \
        [sampling.seed + k if sampling.seed + k < SEEDS else sampling.seed + k - SEEDS for k in range(req.n)]
    return [(first_index + k, Job(prompt=prompt, max_tokens=max_tokens, emit=lambda _e: None,
                                  sampling=replace(sampling, seed=seed), search=search, stop_ids=stop_ids,
                                  logprobs=logprobs))
            for k, seed in enumerate(seeds)]


async def _run(served: Served, job: Job, queue: asyncio.Queue, choice: Choice, stop: list[str], request: Request,
               on_piece: Callable[[str], None] | None = None) -> Choice:
    """Follow one submitted job to its end, filling ``choice`` (text, tokens, finish reason); ``on_piece`` gets the
    text as it comes."""
    text = TextStream(served.tokenizer, stop)
    async for event in _events(served.engine, queue, job, request):
        if isinstance(event, Finished):
            if event.reason == "error":
                raise APIError(500, f"generating this answer failed: {event.error}", type="server_error",
                               code="engine_error")
            choice.finish_reason = "length" if event.reason == "length" else "stop"
            break
        choice.completion_tokens += 1
        if choice.tokens is not None:
            choice.tokens.append(event)
        piece = text.push(event.id)
        choice.text += piece
        if on_piece and piece:
            on_piece(piece)
        if text.stopped:
            choice.finish_reason = "stop"
            job.cancel()
            break
    tail = text.rest()
    if tail:
        choice.text += tail
        if on_piece:
            on_piece(tail)
    return choice


async def _all(runs: list) -> list[Choice]:
    """Await the runs of one request; if one fails, the others are cancelled (their rows freed) and it raises."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs(tokenizer: Tokenizer, tokens: list[Token | None], ids: list[int]) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for tok_id, tok in zip(ids, tokens, strict=True):
        piece = tokenizer.decode([tok_id])
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        out["token_logprobs"].append(None if tok is None else tok.logprob)
        out["top_logprobs"].append(None if tok is None or tok.top is None else
                                   {tokenizer.decode([i]): lp for i, lp in tok.top})
    return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _or_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events; an error once it has begun (its status, 200, is sent) becomes an event in OpenAI's shape,
    which the official client raises, and the stream ends."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield _sse(e.body())
        yield _sse("[DONE]")


def create_app(load: Callable[[], Served], api_key: str | None = None,
               allowed_hosts: Collection[str] = security.LOOPBACK_HOSTS,
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """The app; ``load()`` builds the served model on a background thread (``/health`` is 503 until it is done).

    ``api_key``: the key every request but the chat page and ``/health`` must send (none: no key).
    ``allowed_hosts``: the ``Host`` names answered (``"*"``: any; loopback IP literals always), others get 400
    (see :mod:`lmforge.serve.security`). ``on_load_error``: called with the exception when loading fails
    (``lmforge serve`` stops and reports it); without it, a user's mistake is printed in one line, a bug raised,
    and ``/health`` says which until the app is stopped."""
    state: dict = {}

    async def lifespan(_app: FastAPI):
        def loading() -> None:
            try:
                served = load()
                served.engine.start()
                state["served"] = served
            except UserError as e:  # a user's mistake: one line, and /health says it
                state["error"] = str(e)
                if on_load_error:
                    on_load_error(e)
                else:
                    print(f"lmforge serve: error: {e}", file=sys.stderr, flush=True)
            except Exception as e:
                state["error"] = f"loading the model failed: {type(e).__name__}: {e}"
                if not on_load_error:
                    raise
                on_load_error(e)

        thread = threading.Thread(target=loading, daemon=True)
        thread.start()
        yield
        if "served" in state:
            state["served"].engine.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)

    def served() -> Served:
        if "served" not in state:
            raise APIError(503, state.get("error", "the model is still loading"), type="server_error",
                           code="loading")
        failure = state["served"].engine.failure
        if failure is not None:
            raise _engine_down(failure)
        return state["served"]

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Exception)
    async def bug(_request: Request, e: Exception) -> JSONResponse:
        # Starlette sends this answer, then raises e again: its traceback goes to the server's log.
        return APIError(500, f"the server failed on this request: {type(e).__name__}: {e}",
                        type="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON ({first.get('msg')})").response()
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        shown = first.get("input")
        got = "" if first.get("type") == "missing" else f", got {json.dumps(shown, default=repr)[:80]}"
        what = f"'{param}'" if param else "the request body"
        return APIError(400, f"{what}: {first.get('msg', 'invalid')}{got}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's and Starlette's own refusals (a body it cannot parse, an unknown path, a wrong method).
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail, default=repr)
        return APIError(e.status_code, message, type="invalid_request_error" if e.status_code < 500 else
                        "server_error", headers=e.headers).response()

    # Added before `authorize`, so inside it: a body is read only from a client that may send one.
    app.add_middleware(RequestGuard)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        host = request.headers.get("host")
        if not security.host_allowed(host, allowed_hosts):  # a browser's page from elsewhere, by DNS rebinding?
            shown = json.dumps(host)[:100] if host else "(none)"
            name = security.host_name(host or "") or "NAME"
            return APIError(400, f"this server does not answer to the Host {shown}: only to "
                                 f"{', '.join(allowed_hosts)} (start it with --allowed-hosts {name} to allow it)",
                            code="host_not_allowed").response()
        sent = request.headers.get("authorization", "")
        if api_key and request.url.path not in ("/", "/health") and not security.key_matches(sent, api_key):
            what = "no API key was given" if not sent else "the API key is wrong"
            return APIError(401, f"{what} (send 'Authorization: Bearer KEY')", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if "served" not in state:
            return JSONResponse({"status": "error" if "error" in state else "loading", **state}, status_code=503)
        engine = state["served"].engine
        if engine.failure is not None:
            return JSONResponse({"status": "error", "error": engine.failure}, status_code=503)
        return JSONResponse({"status": "ok", "running": len(engine.rows), "waiting": len(engine.waiting),
                             **engine.stats()})

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # The tokenizer, as vLLM's server offers it: lm-eval's local-completions finds it ("remote" tokenizer backend)
    # and sends token ids, so its log-likelihoods are over this model's own tokens.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        s = served()
        return {"eos_token": s.tokenizer.id_to_token(s.tokenizer.eot_id), "bos_token": None, "pad_token": None,
                "chat_template": s.template and s.template.source, "model_max_length": s.context}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        s = served()

        def answer() -> bytes:  # on a worker thread: a long text's tokens are many to encode and write
            tokens = s.tokenizer.encode_batch([req.prompt], allow_special=True)[0]  # a special token's text: its id
            return json.dumps({"tokens": tokens, "count": len(tokens), "max_model_len": s.context}).encode()

        return Response(await asyncio.to_thread(answer), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        tokenizer = served().tokenizer
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"'tokens' holds {bad[0]}, outside the vocabulary of {tokenizer.vocab_size}",
                           param="tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, req.tokens)}

    @app.get("/v1/models")
    async def models() -> dict:
        s = served()
        return {"object": "list", "data": [{"id": s.name, "object": "model", "owned_by": "lmforge",
                                            "context_length": s.context}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        s = served()
        _check_model(s, req.model)
        sampling, stop = req.sampling(), _stop_list(req.stop)
        seq2seq = s.task == "seq2seq"
        if seq2seq:
            for name, given in (("echo", req.echo), ("logprobs", req.logprobs is not None)):
                if given:
                    raise APIError(400, f"'{name}' is for decoder-only models: this one is an encoder-decoder, whose "
                                        f"answer is a target written for the prompt, not its continuation "
                                        f"(drop '{name}')", param=name)
        elif req.beams > 1:
            raise APIError(400, "'beams': beam search is for encoder-decoder models; this one is a decoder-only "
                                "language model (drop 'beams': temperature 0 decodes greedily)", param="beams")
        search = req.search(sampling)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "'max_tokens' must be at least 1 (0 only with echo)", param="max_tokens")
        if req.stream and (req.echo or req.logprobs is not None):
            raise APIError(400, "'echo' and 'logprobs' are answered without 'stream' only", param="stream")
        vocab = s.engine.model.cfg.vocab_size
        if req.logprobs is not None and req.logprobs > vocab:
            raise APIError(400, f"'logprobs' asks for the {req.logprobs} most likely tokens; the vocabulary has "
                                f"{vocab}", param="logprobs")
        prompts = await asyncio.to_thread(_prompt_ids, s.tokenizer, req.prompt)
        if len(prompts) * req.n > s.engine.max_queue:  # more than could ever wait at once: a 429 would be retried
            raise APIError(400, f"this request asks for {len(prompts) * req.n} answers ({len(prompts)} prompts, "
                                f"n={req.n}); this server takes at most {s.engine.max_queue} at once (--max-queue)",
                           param="prompt")
        jobs, fits = [], []
        for i, ids in enumerate(prompts):
            if seq2seq:  # the prompt is the source: the encoder reads it framed
                fits.append(_fit_source(s, ids, req.max_tokens))
                ids = frame_source(ids, s.context, s.engine.tokens)
            else:
                fits.append(_fit(s, ids, req.max_tokens, "prompt"))
            if fits[-1] > 0:
                jobs += _jobs(req, sampling, ids, fits[-1], frozenset({s.tokenizer.eot_id}), req.logprobs, i * req.n,
                              search)
        want_logprobs = req.logprobs is not None
        choices = {i * req.n + k: Choice(i * req.n + k, tokens=[] if want_logprobs else None)
                   for i in range(len(prompts)) for k in range(req.n)}
        for index, choice in choices.items():
            choice.finish_reason = "length" if fits[index // req.n] == 0 else None
        prompt_tokens = sum(len(p) for p in prompts) * req.n
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def body(chs: list[dict], usage: dict | None = None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": s.name, "choices": chs}
            if usage is not None:
                out["usage"] = usage
            return out

        echoes: dict[int, tuple[str, dict | None]] = {}

        async def echoed(i: int) -> tuple[str, dict | None]:
            """Prompt i's text and, with logprobs, its scored tokens (once per prompt, whatever ``n``)."""
            if not req.echo:
                return "", None
            if i not in echoes:
                ids = prompts[i]
                scored = await asyncio.to_thread(s.engine.score, ids, req.logprobs or 1) if want_logprobs else []
                echoes[i] = s.tokenizer.decode(ids), ({"ids": ids, "tokens": [None, *scored]} if want_logprobs
                                                      else None)
            return echoes[i]

        queues = _submit(s.engine, [job for _index, job in jobs])
        runs = [(choices[index], job, queues[id(job)]) for index, job in jobs]
        if req.stream:
            return StreamingResponse(_or_error(_stream_completion(s, req, request, runs, choices, stop, body,
                                                                  prompt_tokens)), media_type="text/event-stream")
        results = await _all([_run(s, job, queue, choice, stop, request) for choice, job, queue in runs])
        out = []
        for index, choice in sorted(choices.items()):
            prefix, scored = await echoed(index // req.n)
            entry = {"index": index, "text": prefix + choice.text, "finish_reason": choice.finish_reason,
                     "logprobs": None}
            if want_logprobs:
                gen = choice.tokens or []
                ids = (scored["ids"] if scored else []) + [t.id for t in gen]
                entry["logprobs"] = _logprobs(s.tokenizer, (scored["tokens"] if scored else []) + gen, ids)
            out.append(entry)
        return body(out, _usage(prompt_tokens, sum(c.completion_tokens for c in results)))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        s = served()
        _check_model(s, req.model)
        if s.task == "seq2seq":
            raise APIError(400, f"'{s.name}' is an encoder-decoder: it writes a target for a source and does not chat; "
                                f"chat needs a decoder-only (chat-tuned) model. Send the source as the prompt of "
                                f"/v1/completions", param="model", code="model_not_chat")
        if not req.messages:
            raise APIError(400, "'messages' is empty: give at least one message", param="messages")
        sampling, stop = req.sampling(), _stop_list(req.stop)
        messages = [m.model_dump() for m in req.messages]

        def prompt() -> list[int]:  # on a worker thread: long messages take long to render and encode
            try:
                text = s.template.render(messages, add_generation_prompt=True)
            except BadRecord as e:  # the template refuses this conversation (raise_exception)
                raise APIError(400, str(e), param="messages") from None
            return s.tokenizer.encode_batch([text], allow_special=True)[0]

        ids = await asyncio.to_thread(prompt)
        max_tokens = _fit(s, ids, req.max_tokens, "messages")
        if max_tokens == 0:
            raise APIError(400, "'max_tokens' must be at least 1", param="max_tokens")
        jobs = _jobs(req, sampling, ids, max_tokens, frozenset(s.template.stop_ids), None, 0)
        queues = _submit(s.engine, [job for _index, job in jobs])
        runs = [(Choice(index), job, queues[id(job)]) for index, job in jobs]
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_or_error(_stream_chat(s, req, request, runs, stop, cid, created, len(ids))),
                                     media_type="text/event-stream")
        choices = await _all([_run(s, job, queue, choice, stop, request) for choice, job, queue in runs])
        return {"id": cid, "object": "chat.completion", "created": created, "model": s.name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(len(ids) * req.n, sum(c.completion_tokens for c in choices))}

    return app


def _prompt_ids(tokenizer: Tokenizer, prompt: str | list) -> list[list[int]]:
    """The prompts of a completion request as token ids (a string, strings, token ids, or lists of them); meant for a
    worker thread (see :meth:`Tokenizer.encode_batch`)."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "'prompt' is empty: give a string, a list of strings or token ids", param="prompt")
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    out = []
    for p in prompts:
        ids = next(encoded) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"'prompt' holds token id {bad[0]}, outside the vocabulary of {tokenizer.vocab_size}",
                           param="prompt")
        out.append(ids)
    return out


async def _merge(served: Served, runs: list[tuple[Choice, Job, asyncio.Queue]], stop: list[str], request: Request
                 ) -> AsyncIterator[tuple[Choice, str | None]]:
    """Follow submitted jobs side by side; (choice, text piece) as pieces come, then (choice, None) when one ends.
    An APIError of one (its job failed in the engine) is raised here, and the others are cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def one(choice: Choice, job: Job, events: asyncio.Queue) -> None:
        try:
            await _run(served, job, events, choice, stop, request,
                       on_piece=lambda piece: queue.put_nowait((choice, piece)))
        except APIError as e:
            queue.put_nowait((choice, e))
        else:
            queue.put_nowait((choice, None))

    tasks = [asyncio.create_task(one(choice, job, events)) for choice, job, events in runs]
    try:
        for _ in range(len(tasks)):
            while True:
                item = await queue.get()
                if isinstance(item[1], APIError):
                    raise item[1]
                yield item
                if item[1] is None:
                    break
        for task in tasks:
            await task
    finally:
        for (_choice, job, _events), task in zip(runs, tasks, strict=True):
            job.cancel()
            task.cancel()


async def _stream_completion(s: Served, req: CompletionRequest, request: Request, runs: list, choices: dict,
                             stop: list[str], body: Callable, prompt_tokens: int) -> AsyncIterator[str]:
    async for choice, piece in _merge(s, runs, stop, request):
        entry = {"index": choice.index, "text": piece or "", "logprobs": None,
                 "finish_reason": choice.finish_reason if piece is None else None}
        yield _sse(body([entry]))
    if req.stream_options and req.stream_options.include_usage:
        yield _sse(body([], _usage(prompt_tokens, sum(c.completion_tokens for c in choices.values()))))
    yield _sse("[DONE]")


async def _stream_chat(s: Served, req: ChatRequest, request: Request, runs: list, stop: list[str], cid: str,
                       created: int, prompt_tokens: int) -> AsyncIterator[str]:
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return _sse(out)

    for choice, _job, _queue in runs:
        yield chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for choice, piece in _merge(s, runs, stop, request):
        if piece is None:
            yield chunk([{"index": choice.index, "delta": {}, "finish_reason": choice.finish_reason}])
        else:
            yield chunk([{"index": choice.index, "delta": {"content": piece}, "finish_reason": None}])
    if req.stream_options and req.stream_options.include_usage:
        yield chunk([], _usage(prompt_tokens * req.n, sum(c.completion_tokens for c, _job, _queue in runs)))
    yield _sse("[DONE]")


def load_served(o: ServeOptions) -> Served:
    """A run (or checkpoint, or Hugging Face folder) ready to serve: a decoder-only model in an :class:`Engine` with
    its chat template, an encoder-decoder in a :class:`Seq2SeqEngine` (no chat template: it does not chat)."""
    rt = setup_runtime(o.device, o.precision)
    loaded = load_writer(o.run, rt.device, "lmforge serve")
    name = o.model_name or Path(o.run).resolve().name
    if loaded.task == "seq2seq":
        if o.compile:
            raise UserError(f"--compile is for decoder-only runs; '{o.run}' is an encoder-decoder (drop --compile)")
        # Run as `lmforge generate` runs it (its weights as loaded, under the runtime's autocast).
        engine = Seq2SeqEngine(loaded.model, rt, Seq2SeqTokens.of(loaded.tokenizer), max_batch=o.max_batch,
                               max_queue=o.max_queue)
        return Served(name, loaded.tokenizer, None, engine, loaded.model.cfg.block_size, task="seq2seq")
    # Weights in the precision that measured fastest at decoding (lmforge.inference), not autocast.
    if o.compile:
        compile_falls_back_to_eager()
    model, rt, _ = decode_setup(loaded.model.eval(), rt, o.precision, compiled=o.compile)
    engine = Engine(model, rt, max_batch=o.max_batch, max_queue=o.max_queue,
                    step_model=maybe_compile(model, o.compile, dynamic=True), static=o.batching == "static",
                    prefix_cache_mib=o.prefix_cache_mib)
    return Served(name, loaded.tokenizer, run_template(o.run, loaded), engine, model.cfg.block_size)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds one (IPv6 for an address with a colon); a UserError naming
    the address when it cannot be bound (in use, not this machine's, a name that does not resolve)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e} (choose another --host or "
                        f"--port)") from None
    return sock


def serve(o: ServeOptions) -> None:
    """``lmforge serve``: listen on host:port, load the run (``/health`` is 503 meanwhile) and answer until
    interrupted. A model that cannot be loaded stops the server: its exception ends the command (a missing run is
    a UserError, exit status 2) rather than a server answering 503 for ever."""
    import uvicorn

    sock = listen(o.host, o.port)  # before the model loads: a port in use is said at once
    key = security.api_key(o.api_key, os.environ)
    if not key and not security.is_loopback(o.host):
        warnings.warn(f"listening on {o.host} with no API key: anyone who can reach this machine can use the model "
                      f"(set {security.API_KEY_ENV} or --api-key)", stacklevel=1)
    failed: list[Exception] = []
    server: uvicorn.Server

    def stop(e: Exception) -> None:
        failed.append(e)
        server.should_exit = True

    app = create_app(lambda: load_served(o), api_key=key, allowed_hosts=security.allowed_hosts(o.host, o.allowed_hosts),
                     on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    where = f"http://{f'[{o.host}]' if ':' in o.host else o.host}:{o.port}"
    print(f"lmforge serve: {where}/ (chat page), {where}/v1 (OpenAI API) for '{o.run}'"
          f"{' (API key required)' if key else ''}", flush=True)
    server.run(sockets=[sock])
    if failed:
        raise failed[0]
