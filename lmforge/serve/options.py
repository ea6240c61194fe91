"""The options of ``lmforge serve`` (no PyTorch or FastAPI here: the command line is made from them first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.options import RuntimeOptions, check, check_finite, option


@dataclass
class ServeOptions(RuntimeOptions):
    """An OpenAI-compatible server (completions, chat, streaming) and a chat page; an encoder-decoder run answers
    completions only, its prompt the source."""

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network interface)."""
    port: int = 8000
    """Port, 1 to 65535."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on every request but the chat page and /health (default: the
    LMFORGE_API_KEY environment variable, which the process list does not show; unset or empty: no key)."""
    allowed_hosts: list[str] = option([], metavar="NAMES")
    """Host names the server answers besides localhost, 127.0.0.1 and [::1] (comma-separated or repeated; '*':
    any). Default: only those on a loopback --host (against DNS rebinding), any on another."""
    max_batch: int = 16
    """Requests decoded together in one batch."""
    max_queue: int = 64
    """Requests waiting for a free row before the server answers 429."""
    batching: Literal["continuous", "static"] = "continuous"
    """continuous: requests join and leave the running batch between steps; static (to compare): waiting requests
    start only when the whole batch has finished (always so for an encoder-decoder run)."""
    prefix_cache_mib: float = 256
    """MiB of memory for the keys/values of recent prompts and answers, reused by requests that begin with them (a
    system prompt, a chat's earlier turns): their prefill starts where the stored prefix ends. 0: off. Decoder-only
    runs."""
    compile: bool = False
    """torch.compile the model first (decoder-only runs)."""
    model_name: str | None = None
    """The model's name in the API (default: the run directory's name)."""

    def __post_init__(self) -> None:
        check(1 <= self.port <= 65535, "port", "an integer from 1 to 65535", self.port)
        for name in ("max_batch", "max_queue"):
            check(getattr(self, name) >= 1, name, "an integer of at least 1", getattr(self, name))
        check_finite("prefix_cache_mib", self.prefix_cache_mib)
        check(self.prefix_cache_mib >= 0, "prefix_cache_mib", "a number of MiB of at least 0", self.prefix_cache_mib)
        check(self.api_key != "", "api_key", "a non-empty key", "''")
        self.allowed_hosts = [name.strip() for names in self.allowed_hosts for name in names.split(",") if name.strip()]
        for name in self.allowed_hosts:
            check(name == "*" or ("*" not in name and "/" not in name and " " not in name), "allowed_hosts",
                  "host names, comma-separated, or '*'", name)
