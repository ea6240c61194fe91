"""The server's front door: the Host names it answers (DNS rebinding), its API key (from the environment, compared
in constant time), its port, and a model that cannot load ending the command instead of a server answering 503."""

from __future__ import annotations

import hmac
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.options import OptionError
from lmforge.serve import security
from lmforge.serve.app import create_app, listen, serve
from lmforge.serve.options import ServeOptions
from tests.fixtures import HANG_S
from tests.serve.conftest import Server, free_port

LOOPBACK_NAMES = ["localhost", "localhost:8000", "LocalHost.", "127.0.0.1", "127.0.0.1:1", "127.0.0.2:80", "[::1]",
                  "[::1]:8000"]
OTHER_NAMES = ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80",
               "[::2]:8000", "10.0.0.1"]


def _unloaded(**kw) -> Server:
    """A server whose model failed to load: every request that gets past the front door is answered 503."""
    def load():
        raise UserError("no model in this test")

    return Server(create_app(load, on_load_error=lambda _e: None, **kw))


def _command(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_a_server_on_loopback_answers_loopback_host_names_only(server):
    for host in LOOPBACK_NAMES:
        code, _h, answer = server.request("GET", "/v1/models", headers={"Host": host})
        assert code == 200, (host, answer)
    for host in OTHER_NAMES:
        for method, path in (("GET", "/v1/models"), ("GET", "/"), ("GET", "/health"), ("POST", "/v1/completions")):
            code, _h, answer = server.request(method, path, {}, headers={"Host": host})
            assert code == 400 and answer["error"]["code"] == "host_not_allowed", (host, path, answer)
            assert host in answer["error"]["message"]
    assert server.request("GET", "/v1/models")[0] == 200


def test_allowed_hosts_add_names_to_the_loopback_ones_and_star_allows_any():
    srv = _unloaded(allowed_hosts=security.allowed_hosts("127.0.0.1", ["lab.example"]))
    try:
        assert srv.request("GET", "/health", headers={"Host": "lab.example:8000"})[0] == 503  # past the door
        assert srv.request("GET", "/health", headers={"Host": "localhost"})[0] == 503
        assert srv.request("GET", "/health", headers={"Host": "evil.example"})[0] == 400
    finally:
        srv.close()
    srv = _unloaded(allowed_hosts=security.allowed_hosts("127.0.0.1", ["*"]))
    try:
        assert srv.request("GET", "/health", headers={"Host": "evil.example"})[0] == 503
    finally:
        srv.close()


def test_which_host_names_a_listening_address_answers():
    loopback = security.LOOPBACK_HOSTS
    for bind in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert security.allowed_hosts(bind) == loopback, bind
    for bind in ("0.0.0.0", "::", "192.168.1.5"):  # put on the network on purpose: any name
        assert security.allowed_hosts(bind) == ("*",), bind
    assert security.allowed_hosts("0.0.0.0", ["Lab.Example", "gpu1:8000"]) == (*loopback, "lab.example", "gpu1")
    assert security.allowed_hosts("127.0.0.1", ["a.example", "*"]) == ("*",)
    assert ServeOptions("run", allowed_hosts=["a.example, b.example", "c"]).allowed_hosts == ["a.example",
                                                                                            "b.example", "c"]


def test_the_api_key_comes_from_the_environment_and_is_compared_in_constant_time(monkeypatch):
    assert security.api_key(None, {security.API_KEY_ENV: "env"}) == "env"
    assert security.api_key("flag", {security.API_KEY_ENV: "env"}) == "flag"  # the command line wins
    assert security.api_key(None, {security.API_KEY_ENV: ""}) is None
    compared = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or a == b)
    srv = _unloaded(api_key="sésame")

    def status(authorization: str | None) -> int:  # the header's UTF-8 bytes, as a client sends a key
        headers = {"Authorization": authorization.encode().decode("latin-1")} if authorization else {}
        code, _h, answer = srv.request("GET", "/v1/models", headers=headers)
        assert code != 401 or answer["error"]["code"] == "invalid_api_key", answer
        return code

    try:
        assert [status(sent) for sent in (None, "Bearer wrong", "Bearer sésamex", "Basic sésame")] == [401] * 4
        assert [status(sent) for sent in ("Bearer sésame", "bearer sésame")] == [503] * 2  # past the key: no model
    finally:
        srv.close()
    assert len(compared) >= 6


def test_a_port_outside_1_to_65535_is_one_line_and_exit_status_2():
    proc = _command("run", "--port", "70000")
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "--port" in err and "65535" in err, err
    for port in (0, -1):
        with pytest.raises(OptionError, match="port"):
            ServeOptions("run", port=port)


def test_a_port_in_use_is_said_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1 port {taken.getsockname()[1]}"):
            listen("127.0.0.1", taken.getsockname()[1])


def test_a_model_that_cannot_load_ends_serve_with_the_reason(tmp_path):
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            serve(ServeOptions(str(tmp_path), port=free_port(), device="cpu", precision="fp32"))
        except BaseException as e:  # noqa: BLE001 - the test looks at whatever ended it
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=HANG_S)
    assert not thread.is_alive(), "serve kept running with a model that cannot load"
    assert len(outcome) == 1 and isinstance(outcome[0], UserError) and "is not a run directory" in str(outcome[0])


@pytest.mark.slow
def test_serve_on_a_missing_run_exits_2_with_one_line():
    proc = _command("/nonexistent/run", "--port", str(free_port()))
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 2, (out, err)
    assert err.strip().splitlines() == ["lmforge serve: error: '/nonexistent/run' does not exist (expected a run "
                                        "directory or a checkpoint directory)"], err


@pytest.mark.slow
def test_serve_reads_its_key_from_the_environment_and_guards_its_host(run_dir):
    port = free_port()
    proc = _command(str(run_dir), "--port", str(port), "--device", "cpu", "--precision", "fp32",
                    env={security.API_KEY_ENV: "sesame"})

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_S)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if get("/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                time.sleep(0.1)
                continue
            time.sleep(0.1)
        assert "sesame" not in " ".join(proc.args)  # the key is not in the process list
        assert get("/v1/models")[0] == 401
        code, answer = get("/v1/models", {"Authorization": "Bearer sesame"})
        assert code == 200 and answer["data"][0]["id"] == Path(run_dir).name, answer
        assert get("/health", {"Host": "evil.example"})[0] == 400
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, (out, err)
    assert "(API key required)" in out and "sesame" not in out + err
