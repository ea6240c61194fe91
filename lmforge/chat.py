"""Chat templates: render a conversation as text, find a model folder's own template, save it.

Templates are Jinja with Hugging Face's conventions (``messages``, ``add_generation_prompt``,
``eos_token``), so a template saved by ``transformers`` works here and one saved here works there.
SFT renders its examples with one, ``lmforge generate --chat`` wraps prompts with one, and import
and export carry a model's template through (``tokenizer_config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data.records import BadRecord
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\\n' + m['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
"""lmforge's chat format: ``### User:`` / ``### Assistant:`` turns; every answer ends with the
end-of-text token, which is where generation stops."""

ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """A Jinja chat template (Hugging Face conventions: messages, add_generation_prompt, eos_token)."""

    def __init__(self, source: str, tokenizer: Tokenizer, eos_token: str | None = None):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise BadRecord(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise UserError(f"chat template is not valid Jinja: {e}") from None
        self.source = source
        # The token that ends an answer: the model's own (e.g. <|im_end|>) or end-of-text.
        self.eos_token = eos_token or tokenizer.id_to_token(tokenizer.eot_id) or ""
        self.stop_ids = sorted({tokenizer.eot_id, tokenizer.token_to_id(self.eos_token) or tokenizer.eot_id})
        """Token ids at which generation of an answer stops."""

    @classmethod
    def resolve(cls, explicit: str | None, base_dir: Path | None, tokenizer: Tokenizer) -> ChatTemplate:
        """An explicit template file, else the base model's own template, else the default."""
        if explicit:
            path = Path(explicit)
            if not path.is_file():
                raise UserError(f"data.chat_template '{path}' does not exist (expected a Jinja template file)")
            return cls(path.read_text(encoding="utf-8"), tokenizer)
        own = find_chat_template(base_dir) if base_dir is not None else None
        return cls(own[0], tokenizer, own[1]) if own else cls(DEFAULT_CHAT_TEMPLATE, tokenizer)

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_CHAT_TEMPLATE

    def save(self, folder: Path) -> None:
        """Write the template where :func:`find_chat_template` (and transformers) look for it."""
        config = {"chat_template": self.source, "eos_token": self.eos_token}
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    eos_token=self.eos_token, bos_token="")

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant_answer) pieces.

        An answer is what rendering it adds after the generation prompt of the turns before it, up to
        and including its end-of-turn token; everything else (roles, prompts, separators) is context.
        """
        pieces: list[tuple[str, bool]] = []
        done = ""  # the text covered so far
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[:i + 1])
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise UserError("the chat template does not render conversations incrementally "
                                "(each turn must extend the text of the turns before it)")
            answer = full[len(prefix):]
            end = answer.rfind(self.eos_token) if self.eos_token else -1
            cut = end + len(self.eos_token) if end >= 0 else len(answer.rstrip())
            pieces += [(prefix[len(done):], False), (answer[:cut], True)]
            done = prefix + answer[:cut]
        rest = self.render(messages)[len(done):]
        return pieces + [(rest, False)] if rest else pieces


def find_chat_template(folder: Path) -> tuple[str, str | None] | None:
    """A model folder's own chat template and end-of-answer token, as transformers saves them:
    ``chat_template.jinja`` or tokenizer_config.json's ``chat_template``, and its ``eos_token``."""
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos = eos if isinstance(eos, str) else None
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), eos
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return (template, eos) if isinstance(template, str) else None
