"""``lmforge chat``: the history it keeps within the context, its commands, and the REPL in a terminal."""

import contextlib
import io
import os
import pty
import re
import select
import string
import sys
import time
import warnings
from pathlib import Path

import pytest

import lmforge.chat_repl as repl
from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lmforge.chat_repl import ChatSession, chat_loop, fit_history
from lmforge.data.tokenizer import Tokenizer
from lmforge.options import GREEDY
from tests.fixtures import HANG_S, tiny_model

TOKENIZER = Tokenizer.train_char([string.printable])


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def session(block_size: int = 256, max_new_tokens: int = 16) -> ChatSession:
    model = tiny_model(vocab_size=TOKENIZER.vocab_size, block_size=block_size)
    return ChatSession(model, TOKENIZER, ChatTemplate(DEFAULT_CHAT_TEMPLATE, TOKENIZER),
                       max_new_tokens=max_new_tokens, sampling=GREEDY)


def scripted_generate_text(replies: dict[str, str], prompts: list[str]):
    """Stands in for generate_text: records each prompt, answers with the reply of the first key in it
    (a reply of None is Ctrl-C pressed mid-reply), streams the answer."""

    def fake(model, tokenizer, texts, max_new_tokens, sampling, *, stream=None, **kwargs):
        prompts.append(texts[0])
        answer = next(replies[key] for key in replies if key in texts[0].rsplit("### User:", 1)[-1])
        if answer is None:
            raise KeyboardInterrupt
        if stream is not None:
            stream.write(answer)
        return [answer]

    return fake


def test_fit_history_drops_the_oldest_exchanges_and_keeps_the_system_and_the_new_message():
    def n_chars(messages):
        return sum(len(m["content"]) for m in messages)

    system = [message("system", "s" * 10)]
    turns = [message("user", "u1..."), message("assistant", "a1..."), message("user", "u2..."),
             message("assistant", "a2..."), message("user", "u3...")]
    assert fit_history(system, turns, n_chars, 35) == turns
    assert fit_history(system, turns, n_chars, 34) == turns[2:]
    assert fit_history(system, turns, n_chars, 0) == turns[4:]  # too long even alone: generation truncates it
    assert fit_history([], turns, n_chars, 15) == turns[2:]


def test_the_second_turn_renders_the_first_turn_and_the_models_reply():
    chat = session()
    first = chat.reply("first question")
    assert first, "the test model should say something"
    prompt, _ = chat.prompt("second question")
    assert prompt == chat.template.render([message("user", "first question"), message("assistant", first),
                                           message("user", "second question")], add_generation_prompt=True)


def test_the_oldest_turns_give_way_to_keep_the_conversation_within_the_context(monkeypatch):
    prompts: list[str] = []
    monkeypatch.setattr(repl, "generate_text", scripted_generate_text({"": "x" * 20}, prompts))
    chat = session(block_size=160, max_new_tokens=20)
    chat.system = "be kind"
    for i in range(8):
        chat.reply(f"question {i}")
    assert all(len(TOKENIZER.encode(p, allow_special=True)) + 20 <= 160 for p in prompts)
    assert "question 0" in prompts[0] and "question 0" not in prompts[-1]
    assert prompts[-1].startswith("be kind") and "question 6" in prompts[-1] and "question 7" in prompts[-1]


def test_commands_and_a_reply_stopped_by_ctrl_c(monkeypatch):
    prompts: list[str] = []
    monkeypatch.setattr(repl, "generate_text", scripted_generate_text({"stop me": None, "": "an answer"}, prompts))
    chat = session()
    lines = iter(["hi", "/system be brief", "stop me", "/bogus", "", "/reset", "again", "/exit", "never read"])
    out = io.StringIO()
    chat_loop(chat, read=lambda _: next(lines), out=out)
    assert next(lines) == "never read", "/exit ends the loop"
    text = out.getvalue()
    assert text.count("an answer") == 2 and "(reply stopped)" in text and "unknown command /bogus" in text
    # A stopped reply leaves no turn behind; /reset forgets the rest; the system message stays.
    assert chat.turns == [message("user", "again"), message("assistant", "an answer")]
    assert prompts[-1].startswith("be brief") and "hi" not in prompts[-1] and "stop me" not in prompts[-1]


def test_a_blank_reply_says_the_model_ended_its_turn_at_once(monkeypatch):
    monkeypatch.setattr(repl, "generate_text", scripted_generate_text({"nothing": "", "": "an answer"}, []))
    lines = iter(["say nothing", "say something", "/exit"])
    out = io.StringIO()
    chat_loop(session(), read=lambda _: next(lines), out=out)
    blank, answered = out.getvalue().splitlines()
    assert blank == "(the model ended its turn at once: no reply; try sampling with -t 0.8, or more training)"
    assert answered == "an answer"


def test_end_of_input_ends_the_loop_and_ctrl_c_at_the_prompt_asks_again():
    def read(_):
        event = next(events)
        if isinstance(event, BaseException):
            raise event
        return event

    events = iter([KeyboardInterrupt(), "/system x", EOFError()])
    chat = session()
    chat_loop(chat, read=read, out=io.StringIO())
    assert chat.system == "x"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A tiny character-level run, pretrained for a few seconds (it speaks, if not well)."""
    import textwrap

    from lmforge import load_train_config, train

    folder = tmp_path_factory.mktemp("chat")
    (folder / "text.txt").write_text(Path(textwrap.__file__).read_text())
    result = train(load_train_config(None, [
        f"data.sources=[{folder / 'text.txt'}]", "data.tokenizer=char", f"out_dir={folder / 'run'}",
        "model.preset=gpt2-tiny", "model.n_layer=1", "model.block_size=64", "train.batch_size=8",
        "train.max_steps=30", "train.eval_interval=30", "train.eval_batches=1", "train.log_interval=30",
        "optim.lr=1e-2", "optim.warmup_steps=5", "sample.num_samples=0"]), progress=False)
    return result.run_dir


def read_until(fd: int, marker: str, timeout: float = HANG_S) -> str:
    """What the terminal shows up to and including the next ``marker`` (escape sequences removed)."""
    text, deadline = "", time.monotonic() + timeout
    while marker not in text:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no {marker!r} within {timeout} s; the terminal showed {text!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the process closed the terminal
            chunk = b""
        assert chunk, f"the process ended before {marker!r}; the terminal showed {text!r}"
        text += re.sub(r"\x1b\[[?0-9;]*[A-Za-z]", "", chunk.decode(errors="replace"))
    return text


def test_chat_in_a_terminal_streams_two_replies_and_ctrl_d_exits_0(chat_run):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the pseudo-terminal as its terminal
        os.execve(sys.executable, [sys.executable, "-m", "lmforge", "chat", str(chat_run), "-n", "12", "-t", "1"],
                  {**os.environ, "TERM": "dumb"})
    try:
        assert "chatting with" in read_until(fd, ">> ")
        replies = []
        for question in ("hello there", "and then?"):
            os.write(fd, question.encode() + b"\n")
            shown = read_until(fd, ">> ")
            replies.append(shown.split(question, 1)[1].removesuffix(">> ").strip())
        assert all(replies), f"two replies expected, got {replies}"
        os.write(fd, b"\x04")  # Ctrl-D at the prompt
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):  # still running after a failure: end it
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def test_generate_chat_prints_the_answer_without_the_rendered_template(chat_run, capsys, monkeypatch):
    from lmforge.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its one-line format
    assert main(["generate", str(chat_run), "--chat", "-p", "hi", "-n", "6", "-t", "1"]) == 0
    single = capsys.readouterr().out
    assert main(["generate", str(chat_run), "--chat", "-p", "hi", "-p", "yo", "-n", "6", "-t", "1"]) == 0
    batch = capsys.readouterr().out
    assert "### " not in single + batch
    assert single.strip() and batch.startswith("hi\n") and "----\nyo\n" in batch


def test_generate_chat_says_so_when_the_model_ends_its_turn_at_once(chat_run, capsys, monkeypatch):
    import lmforge.generate as gen
    from lmforge.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(gen, "generate_text", lambda *a, **k: ["" for _ in a[2]])  # end of turn first: no text
    assert main(["generate", str(chat_run), "--chat", "-p", "hi", "-t", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n"
    assert err.splitlines()[-1] == "(the model ended its turn at once: no reply; try sampling with -t 0.8, or more " \
                                   "training)"
    monkeypatch.setattr(gen, "generate_text", lambda *a, **k: ["", "an answer"])
    assert main(["generate", str(chat_run), "--chat", "-p", "hi", "-p", "yo"]) == 0
    out, err = capsys.readouterr()
    assert out == "hi\n\n----\nyo\nan answer\n----\n"
    assert err.splitlines()[-1] == "(prompt 1: the model ended its turn at once: no reply; try another --seed, or " \
                                   "more training)"
