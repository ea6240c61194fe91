"""Fuzzing with hypothesis: whatever the input, a user mistake is a UserError (one line at the CLI),
never another exception, and the same input gives the same output.

The example counts are small and the examples the same every run here (profile "ci", derandomized);
``python bench/fuzz.py`` runs 2,000 random ones per target (``LMFORGE_FUZZ=bench``). The server's target (100
bodies in the suite): every body is answered below 500 (a 4xx in OpenAI's error shape) and the server answers the
next normal request.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmforge.config import DataConfig, load_finetune_config, load_train_config
from lmforge.data.prepare import prepare
from lmforge.data.records import read_records
from lmforge.errors import UserError
from lmforge.evaluate.tasks import read_choice_task, read_generation_task
from lmforge.generate import generate
from tests.fixtures import tiny_model

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("bench", max_examples=int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", 2000)), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LMFORGE_FUZZ", "ci"))

# --------------------------------------------------------------------------------------------------
# prepare: random bytes, invalid UTF-8, NULs, empty files, long lines, malformed JSONL and Parquet

TEXTS = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=3000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(alphabet="ab \n", min_size=2000, max_size=20000).map(str.encode),  # long lines, little variety
    st.lists(st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.hex())), max_size=30)
    .map(lambda lines: "\n".join(json.dumps({"text": x}) if i % 3 else x for i, x in enumerate(lines)).encode()),
)
FILES = st.lists(st.tuples(st.sampled_from([".txt", ".py", ".md", ".jsonl", ".parquet"]), TEXTS),
                 min_size=1, max_size=3)


def _prepare_hash(files: list[tuple[str, bytes]], tokenizer: str, root: Path) -> str | None:
    """sha256 of train.bin + val.bin + meta's counts, or None when prepare says the input is unusable."""
    src = root / "src"
    src.mkdir()
    for i, (suffix, data) in enumerate(files):
        (src / f"f{i}{suffix}").write_bytes(data)
    cfg = DataConfig(sources=[str(src)], tokenizer=tokenizer, vocab_size=300, val_fraction=0.2, workers=1)
    try:
        meta = prepare(cfg, root / "out", progress=False)
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return None
    h = hashlib.sha256(json.dumps(meta["splits"], sort_keys=True).encode())
    for split in ("train", "val"):
        h.update((root / "out" / f"{split}.bin").read_bytes())
    return h.hexdigest()


@given(files=FILES, tokenizer=st.sampled_from(["char", "bpe"]))
def test_prepare_never_crashes_and_is_deterministic(files, tokenizer):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        assert _prepare_hash(files, tokenizer, Path(a)) == _prepare_hash(files, tokenizer, Path(b))


# --------------------------------------------------------------------------------------------------
# Config keys and values

KEYS = ["out_dir", "data.sources", "data.vocab_size", "data.val_fraction", "data.tokenizer", "model.preset",
        "model.n_layer", "model.n_head", "model.n_kv_head", "model.n_embd", "model.block_size", "model.dropout",
        "model.mlp", "model.rope_theta", "optim.lr", "optim.beta2", "optim.grad_clip", "optim.decay_steps",
        "train.max_steps", "train.batch_size", "train.grad_accum", "train.eval_interval", "train.precision",
        "train.max_minutes", "train.patience", "sample.temperature", "sample.top_k", "model", "train",
        "nonsense", "model.nonsense", "train.max_steps.x"]
VALUES = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.none(), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                   st.sampled_from(["nan", "inf", "-1", "1e8", "3e-4", "[a, b]", "{x: 1}", "gpt2-tiny", "fp8"]))


def _override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4), finetune=st.booleans())
def test_config_overrides_are_loaded_or_refused_in_one_line(pairs, finetune):
    overrides = [_override(k, v) for k, v in pairs]
    try:
        if finetune:
            load_finetune_config(None, ["base=runs/x", "data.train=x.jsonl", *overrides])
        else:
            load_train_config(None, overrides)
    except UserError as e:
        assert "\n" not in str(e), str(e)


# --------------------------------------------------------------------------------------------------
# generate's arguments

MODEL = tiny_model()


@given(prompts=st.lists(st.lists(st.integers(0, 96), max_size=40), min_size=1, max_size=3),
       max_new=st.integers(-3, 40), temperature=st.one_of(st.floats(-1, 3), st.just(0.0)),
       top_k=st.one_of(st.none(), st.integers(-2, 120)), top_p=st.one_of(st.none(), st.floats(-0.5, 1.5)),
       penalty=st.floats(-1, 3), seed=st.integers(0, 2**31))
def test_generate_arguments_give_tokens_or_a_user_error(prompts, max_new, temperature, top_k, top_p, penalty,
                                                        seed):
    def run() -> list[list[int]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # prompts past the context are cut, with a warning
            return generate(MODEL, prompts, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=penalty, seed=seed)

    try:
        out = run()
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return
    assert len(out) == len(prompts) and all(0 <= t < MODEL.cfg.vocab_size for row in out for t in row)
    assert run() == out  # the same seed, the same tokens


# --------------------------------------------------------------------------------------------------
# Evaluation records (JSONL and CSV)

RECORD = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "reference", "references", "context", "choices", "label", "text"]),
                    st.one_of(st.text(max_size=20), st.integers(-3, 5), st.lists(st.text(max_size=8), max_size=4),
                              st.none(), st.floats()), max_size=5).map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


@given(lines=st.lists(RECORD, max_size=8), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_evaluation_records_are_read_or_refused_in_one_line(lines, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"task{suffix}"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
        for read in (read_generation_task, read_choice_task, lambda p: read_records(p, dict, True)):
            try:
                items = read(str(path))
            except UserError as e:
                assert "\n" not in str(e), str(e)
                continue
            assert isinstance(items, list) and items


# --------------------------------------------------------------------------------------------------
# The server's request bodies: a real uvicorn on 127.0.0.1 with a tiny model of 12 tokens (fewer than the 20
# logprobs a request may ask for), every endpoint that reads a body, and after each body a normal request

VOCAB_TEXT = "abcdefgh \n{}"
NORMAL = {"model": "fuzz", "prompt": "ab", "max_tokens": 2, "temperature": 0}
BASES = {  # a valid body per endpoint: the fields a mutation replaces, drops or adds to
    "/v1/completions": NORMAL,
    "/v1/chat/completions": {"model": "fuzz", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 3},
    "/tokenize": {"prompt": "ab"},
    "/detokenize": {"tokens": [1, 2]},
}
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
          "seed", "n", "stream", "stream_options", "logprobs", "echo", "tokens", "add_special_tokens", "user",
          "role", "content"]
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
TEXT = st.one_of(st.text(max_size=30), st.text(VOCAB_TEXT, max_size=30),
                 st.tuples(st.text(VOCAB_TEXT, max_size=5), SURROGATES).map("".join),
                 st.sampled_from([1_000, 20_000, 100_000, 2_000_000]).map(lambda n: "ab" * (n // 2)))  # long; 2 MB: 413
NUMBER = st.one_of(st.integers(-3, 70), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1, 10**30, 10**400, 1e308]))
LEAF = st.one_of(NUMBER, TEXT, st.booleans(), st.none())
NESTED = st.one_of(LEAF, st.lists(LEAF, max_size=5), st.dictionaries(st.sampled_from(FIELDS), LEAF, max_size=4))
VALUE = st.one_of(NESTED, st.lists(NESTED, max_size=4), st.dictionaries(st.sampled_from(FIELDS), NESTED, max_size=4))
TOKENS = st.lists(st.integers(-2, 14), max_size=70)  # token ids, some outside the vocabulary, some past the context
TEXTS = st.lists(TEXT, max_size=5)
SHORT = st.text(VOCAB_TEXT, max_size=12)
TYPED = {  # values of a field's own type, mostly valid, edges included (a huge seed, more logprobs than tokens, ...)
    "model": st.sampled_from(["fuzz", "fuzz", "fuzz", "other"]),
    "prompt": st.one_of(SHORT, st.lists(SHORT, min_size=1, max_size=3), st.lists(st.integers(0, 11), max_size=20),
                        st.lists(st.lists(st.integers(0, 11), max_size=8), min_size=1, max_size=3), TEXT, TEXTS,
                        TOKENS, st.lists(TOKENS, max_size=4)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                                "content": st.one_of(SHORT, SHORT, TEXT)}), max_size=3),
    "max_tokens": st.one_of(st.integers(0, 40), st.integers(-1, 70), st.none()),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, -1, 1e308])),
    "top_p": st.floats(0, 1.5),
    "top_k": st.one_of(st.integers(-1, 30), st.none()),
    "repetition_penalty": st.one_of(st.floats(0, 3), st.just(1e308)),
    "stop": st.one_of(SHORT, st.lists(SHORT, max_size=5), TEXT, TEXTS, st.none()),
    "seed": st.one_of(st.integers(-1, 2**64 + 1), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64]), st.none()),
    "n": st.integers(0, 17),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.one_of(st.integers(-1, 21), st.none()),
    "echo": st.booleans(),
    "tokens": TOKENS,
    "add_special_tokens": st.booleans(),
}


def _mutated(path: str) -> st.SearchStrategy[bytes]:
    """The endpoint's valid body with a few fields set (mostly to a value of their type), dropped or added."""
    changes = st.lists(st.sampled_from(sorted(TYPED)), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.one_of(TYPED[k], TYPED[k], TYPED[k], VALUE) for k in keys}))
    return st.tuples(changes, st.sets(st.sampled_from(sorted(BASES[path])), max_size=1)).map(
        lambda t: json.dumps({**{k: v for k, v in BASES[path].items() if k not in t[1]}, **t[0]}).encode())


def _bodies(path: str) -> st.SearchStrategy[tuple[str, bytes]]:
    mutated = _mutated(path)
    body = st.sampled_from([  # two in three: a valid body with a few fields changed (one_of would merge the copies)
        *[mutated] * 6,
        VALUE.map(lambda v: json.dumps(v).encode()),  # JSON, but not an object
        st.binary(max_size=200),  # not JSON, not even UTF-8
        st.sampled_from([b"", b"{", b'{"model": "fuzz", "prompt": "ab"', b"null", b'{"prompt": "\\ud800"}']),
    ]).flatmap(lambda strategy: strategy)
    return st.tuples(st.just(path), body)


REQUEST = st.sampled_from(sorted(BASES)).flatmap(_bodies)
CONTENT_TYPE = st.sampled_from(["application/json"] * 15 + ["application/json; charset=latin-1", "text/plain",
                                "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""])


@pytest.fixture(scope="module")
def fuzz_server():
    """A server on a 12-token model (random weights: what it says does not matter here)."""
    from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.runtime import Runtime
    from lmforge.serve.app import Served, create_app
    from lmforge.serve.engine import Engine
    from tests.serve.conftest import Server

    tokenizer = Tokenizer.train_char([VOCAB_TEXT])
    model = tiny_model(vocab_size=tokenizer.vocab_size, block_size=64)
    # One thread: a model this small gains nothing from a second, and on a busy CPU waking the sleeping second thread
    # costs ~100 ms a step (PyTorch's setting is global: restored after the module).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(model, Runtime(torch.device("cpu"), "fp32"), max_batch=4, max_queue=64)
    server = Server(create_app(lambda: Served("fuzz", tokenizer, ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokenizer),
                                              engine, model.cfg.block_size)))
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()
        torch.set_num_threads(threads)


@settings(max_examples=max(100, settings.default.max_examples))  # 100 in the suite: a body costs ~15 ms
@given(request=REQUEST, content_type=CONTENT_TYPE)
def test_no_request_body_gets_a_server_error_or_harms_the_next_request(fuzz_server, request, content_type):
    path, body = request
    status, _headers, answer = fuzz_server.request("POST", path, body, {"Content-Type": content_type})
    event(f"HTTP {status}")
    assert status < 500, (status, answer)
    if status >= 400:
        assert isinstance(answer, dict) and answer["error"]["message"], answer  # OpenAI's shape
    status, _headers, answer = fuzz_server.request("POST", "/v1/completions", NORMAL)
    assert status == 200 and len(answer["choices"]) == 1, answer
