"""``lmforge chat RUN``: a conversation with a model in its chat template, each reply streamed.

Like ``litgpt chat`` and ``transformers chat``: every turn renders the whole conversation (the
system message, the turns so far, the new user message) with the run's
:class:`~lmforge.chat.ChatTemplate` and continues it up to the template's end-of-answer token. The
model's context bounds the conversation: when the rendered turns plus ``max_new_tokens`` would not
fit ``block_size``, the oldest turns are dropped (the system message stays).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from lmforge.chat import ChatTemplate
from lmforge.data.records import BadRecord
from lmforge.data.tokenizer import Tokenizer
from lmforge.generate import blank_note, generate_text
from lmforge.inference import decode_setup
from lmforge.loading import load_lm, run_template
from lmforge.model.gpt import GPT
from lmforge.options import ChatOptions, Sampling
from lmforge.runtime import compile_falls_back_to_eager, maybe_compile, setup_runtime

with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has readline
    import readline  # noqa: F401

COMMANDS = ("/reset forgets the conversation, /system TEXT sets the system message (/system alone removes it), "
            "/exit (or Ctrl-D) ends; Ctrl-C stops a reply")


def fit_history(system: list[dict], turns: list[dict], n_tokens: Callable[[list[dict]], int],
                budget: int) -> list[dict]:
    """``turns`` without as many of the oldest as must go for ``n_tokens(system + turns) <= budget``.

    turns alternate user and assistant messages and end with the new user message; they are dropped
    a user message and its answer at a time. The system message and the new user message always stay:
    if they alone are too long, generation keeps the prompt's last tokens or slides past the context
    (:func:`lmforge.generate.generate`, with a warning).
    """
    while len(turns) > 1 and n_tokens(system + turns) > budget:
        turns = turns[2:]
    return turns


class ChatSession:
    """A conversation with a model: its system message, its turns so far, and the sampling settings."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, template: ChatTemplate, *, max_new_tokens: int,
                 sampling: Sampling):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.system: str | None = None
        self.turns: list[dict] = []
        """User and assistant messages, oldest first; only finished replies are kept."""

    def n_tokens(self, messages: list[dict]) -> int:
        """Tokens of the conversation rendered up to where the next answer starts."""
        return len(self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True),
                                         allow_special=True))

    def prompt(self, text: str) -> tuple[str, list[dict]]:
        """The rendered prompt for the next user message ``text``, and the turns it holds (text last)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        budget = self.model.cfg.block_size - self.max_new_tokens
        turns = fit_history(system, [*self.turns, {"role": "user", "content": text}], self.n_tokens, budget)
        return self.template.render(system + turns, add_generation_prompt=True), turns

    def reply(self, text: str, stream: TextIO | None = None) -> str:
        """The model's answer to the user message ``text`` (written to ``stream`` as it comes), added to the turns."""
        prompt, turns = self.prompt(text)
        answer = generate_text(self.model, self.tokenizer, [prompt], self.max_new_tokens, self.sampling, stream=stream,
                               allow_special=True, stop_ids=self.template.stop_ids)[0]
        # Reached only when the reply finished (Ctrl-C raises past it): the history never holds half an answer.
        self.turns = [*turns, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        """Forget the turns (the system message stays)."""
        self.turns = []


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read a message or a command, stream the reply; until /exit or the end of the input."""
    while True:
        try:
            text = read(">> ").strip()
        except EOFError:  # Ctrl-D
            out.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in Python's own REPL
            out.write("\n")
            continue
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            out.write("(the conversation is forgotten)\n")
        elif command == "/system":
            session.system = rest.strip() or None
            out.write("(system message set)\n" if session.system else "(no system message)\n")
        elif command.startswith("/"):
            out.write(f"unknown command {command}: {COMMANDS}\n")
        else:
            try:
                note = blank_note(session.reply(text, stream=out), session.sampling, chat=True)
                if note:
                    out.write(f"({note})")
            except KeyboardInterrupt:
                out.write("\n(reply stopped)")
            except BadRecord as e:  # the template refuses the conversation (e.g. a system message)
                out.write(f"error: {e}")
            out.write("\n")
        out.flush()


def chat_command(o: ChatOptions) -> None:
    """``lmforge chat``: load the run, resolve its chat template, talk on stdin/stdout."""
    rt = setup_runtime(o.device, o.precision)
    run = load_lm(o.run, rt.device, "lmforge chat")
    if o.compile:
        compile_falls_back_to_eager()
    model, rt, how = decode_setup(run.model, rt, o.precision, compiled=o.compile)
    model = maybe_compile(model, o.compile, dynamic=True)
    session = ChatSession(model, run.tokenizer, run_template(o.run, run), max_new_tokens=o.max_new_tokens,
                          sampling=o.sampling)
    print(f"chatting with '{o.run}' (a context of {model.cfg.block_size} tokens, {how}): {COMMANDS}",
          file=sys.stderr)
    with rt.autocast():
        chat_loop(session)
