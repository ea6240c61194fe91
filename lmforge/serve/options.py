"""The options of ``lmforge serve`` (no PyTorch or FastAPI here: the command line is made from them first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.options import RuntimeOptions, check, option


@dataclass
class ServeOptions(RuntimeOptions):
    """An OpenAI-compatible server (completions, chat, streaming) and a chat page."""

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1/ requests (default: none)."""
    max_batch: int = 16
    """Requests decoded together in one batch."""
    max_queue: int = 64
    """Requests waiting for a free row before the server answers 429."""
    batching: Literal["continuous", "static"] = "continuous"
    """continuous: requests join and leave the running batch between steps; static (to compare): waiting requests
    start only when the whole batch has finished."""
    compile: bool = False
    """torch.compile the model first."""
    model_name: str | None = None
    """The model's name in the API (default: the run directory's name)."""

    def __post_init__(self) -> None:
        for name in ("port", "max_batch", "max_queue"):
            check(getattr(self, name) >= 1, name, "an integer of at least 1", getattr(self, name))
