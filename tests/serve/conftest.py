"""A small trained model (character level, real Python source) and a server on it, in this process."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from lmforge.config import load_train_config
from lmforge.training.pretrain import train
from tests.fixtures import HANG_S


@pytest.fixture(scope="package")
def run_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "corpus.txt"
    src.write_text(Path(json.__file__).read_text() * 2)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_train_config(None, [f"data.sources=[{src}]", "data.tokenizer=char", f"out_dir={out}",
                                   "model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=64",
                                   "train.batch_size=8", "train.max_steps=60", "train.eval_interval=60",
                                   "train.eval_batches=1", "train.log_interval=60", "optim.lr=3e-3",
                                   "train.device=cpu", "train.precision=fp32", "sample.num_samples=0"]),
          progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + HANG_S
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, f"uvicorn did not start within {HANG_S} s"

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict | str]:
        """(status, headers, JSON body or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HANG_S)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            payload = raw
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.request("GET", "/health")[0] == 200:
                return
            time.sleep(0.05)
        raise AssertionError("the server never became ready")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=HANG_S)


def start(run_dir: Path, api_key: str | None = None, **kw) -> tuple[Server, dict]:
    """A server on ``run_dir``; also returns the app's state holder so tests can reach the engine."""
    from lmforge.serve.app import create_app, load_served
    from lmforge.serve.options import ServeOptions

    holder: dict = {}

    def load():
        holder["served"] = load_served(ServeOptions(str(run_dir), device="cpu", precision="fp32", **kw))
        return holder["served"]

    server = Server(create_app(load, api_key=api_key))
    server.wait_ready()
    return server, holder


@pytest.fixture(scope="package")
def server(run_dir):
    srv, holder = start(run_dir, max_batch=8, max_queue=16)
    srv.served = holder["served"]
    yield srv
    srv.close()
