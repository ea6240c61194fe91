"""Supervised fine-tuning on conversations: chat template, loss masking, padding or packing.

A record is ``{"prompt", "response"}`` (one user turn and its answer) or ``{"messages": [{"role",
"content"}, ...]}``. The conversation is rendered with a Jinja chat template (the base tokenizer's
own, or :data:`DEFAULT_CHAT_TEMPLATE`), and only the assistant turns are learned: every other
token's target is -100, which the loss ignores.

Packed rows hold several examples back to back; each example keeps its own positions (0, 1, ...)
and a block-diagonal causal mask stops attention at example boundaries, so a packed example
computes exactly what it would alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.finetune.records import BadRecord, require

IGNORE = -100

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


def record_to_messages(record: dict, prompt_field: str, response_field: str, messages_field: str) -> list[dict]:
    """A record's conversation, checked; BadRecord names what is wrong."""
    if messages_field in record:
        messages = require(record, messages_field, list)
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise BadRecord(f"{messages_field}[{j}] should be {{\"role\": one of {', '.join(ROLES)}, "
                                f"\"content\": text}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord(f"{messages_field} has no assistant message to learn")
        return messages
    if prompt_field not in record and response_field not in record:
        raise BadRecord(f"expected '{prompt_field}' and '{response_field}' fields, or '{messages_field}'")
    return [{"role": "user", "content": require(record, prompt_field)},
            {"role": "assistant", "content": require(record, response_field)}]


@dataclass
class Example:
    """One training example: inputs and next-token targets (IGNORE where nothing is learned)."""

    inputs: list[int]
    targets: list[int]
    truncated: bool = False


def encode_example(messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate, max_len: int) -> Example:
    """Tokenize a conversation, learn only the answers, keep at most ``max_len`` inputs."""
    ids: list[int] = []
    learn: list[bool] = []
    for text, is_answer in template.segments(messages):
        piece = tokenizer.encode(text, allow_special=True)
        ids += piece
        learn += [is_answer] * len(piece)
    truncated = len(ids) > max_len + 1
    ids, learn = ids[:max_len + 1], learn[:max_len + 1]
    # Position t predicts token t+1: its target counts if token t+1 belongs to an answer.
    targets = [tok if keep else IGNORE for tok, keep in zip(ids[1:], learn[1:], strict=True)]
    return Example(ids[:-1], targets, truncated)


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), right-padded to the longest example; pads are never learned."""
    T = max(len(e.inputs) for e in examples)
    x = torch.tensor([e.inputs + [pad_id] * (T - len(e.inputs)) for e in examples])
    y = torch.tensor([e.targets + [IGNORE] * (T - len(e.targets)) for e in examples])
    return x, y


@dataclass
class PackedRow:
    inputs: list[int]
    targets: list[int]
    positions: list[int]
    segments: list[int]
    """Which example each slot belongs to (-1: padding)."""


def pack_examples(examples: list[Example], block_size: int, pad_id: int) -> list[PackedRow]:
    """First-fit packing, in the given order, into rows of ``block_size`` slots."""
    rows: list[PackedRow] = []
    free: list[int] = []  # free slots per row
    for e in examples:
        n = len(e.inputs)
        r = next((i for i, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append(PackedRow([], [], [], []))
            free.append(block_size)
            r = len(rows) - 1
        row = rows[r]
        seg = max(row.segments, default=-1) + 1
        row.inputs += e.inputs
        row.targets += e.targets
        row.positions += range(n)
        row.segments += [seg] * n
        free[r] -= n
    for row, f in zip(rows, free, strict=True):
        row.inputs += [pad_id] * f
        row.targets += [IGNORE] * f
        row.positions += [0] * f
        row.segments += [-1] * f
    return rows


def packed_batch(rows: list[PackedRow]) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, positions, mask): the mask is causal and block-diagonal over examples.

    Padding slots form a block of their own, in which each slot still sees itself, so no row of
    the mask is empty (an all-masked row gives NaN in some attention kernels).
    """
    x = torch.tensor([r.inputs for r in rows])
    y = torch.tensor([r.targets for r in rows])
    pos = torch.tensor([r.positions for r in rows])
    seg = torch.tensor([r.segments for r in rows])
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return x, y, pos, mask[:, None]


def sft_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean cross-entropy over the learned (answer) tokens of a padded or packed batch."""
    if len(batch) == 2:
        return model(batch[0], batch[1])[1]
    x, y, positions, mask = batch
    return model(x, y, positions=positions, mask=mask)[1]
