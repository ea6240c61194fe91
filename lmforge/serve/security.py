"""Who may talk to the server: the ``Host`` names it answers (against DNS rebinding) and its API key.

DNS rebinding: a web page on ``evil.example`` whose name the attacker then points at 127.0.0.1 can read a server on
this machine with the browser's help (same origin, as far as the browser knows). The browser still sends
``Host: evil.example``, so a server that answers only the names it is known by on this machine is out of reach. As in
Jupyter: a server listening on a loopback address answers only loopback names (``localhost``, ``127.0.0.1``,
``[::1]``, any port); one listening elsewhere (``--host 0.0.0.0``) was put on the network on purpose and answers any
name; ``--allowed-hosts`` adds names to the loopback ones (and then restricts a non-loopback server to them), ``*``
allows any. Starlette's ``TrustedHostMiddleware`` compares names the same way but answers in plain text, not in
OpenAI's error shape, and cannot say "any loopback address"; hence these few lines.

Plain Python (no FastAPI, no PyTorch): the rules can be read and tested alone.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Collection, Mapping

API_KEY_ENV = "LMFORGE_API_KEY"
"""The environment variable ``lmforge serve`` reads its API key from when ``--api-key`` is not given (a key on the
command line is visible to every user of the machine in the process list; one in the environment is not)."""
ANY_HOST = "*"
"""In an allow-list of hosts: every name."""
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""The names a server on a loopback address answers (any other loopback IP literal too, e.g. 127.0.0.2)."""


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower case, without its port, brackets or trailing dot: ``[::1]:8000`` ->
    ``::1``, ``LocalHost.:80`` -> ``localhost``."""
    host = header.strip().lower()
    if host.startswith("["):  # an IPv6 literal: [addr] or [addr]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port (a bare IPv6 address, unbracketed, has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(bind_host: str) -> bool:
    """Whether listening on ``bind_host`` reaches this machine only: a loopback address, ``localhost``, or a name
    all of whose addresses are loopback ones (Debian's own host name is often 127.0.1.1)."""
    host = host_name(bind_host)
    if host == "localhost" or _is_loopback_ip(host):
        return True
    try:
        ipaddress.ip_address(host)
        return False  # another address literal (0.0.0.0, ::, a LAN address)
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False  # unresolvable: listening on it fails with its own message
    return bool(addresses) and all(_is_loopback_ip(a.partition("%")[0]) for a in addresses)


def allowed_hosts(bind_host: str, listed: Collection[str] = ()) -> tuple[str, ...]:
    """The ``Host`` names a server listening on ``bind_host`` answers, given ``--allowed-hosts`` (``listed``):
    the loopback names plus the listed ones; with none listed, the loopback names on a loopback address and any
    name (``("*",)``) elsewhere."""
    names = tuple(dict.fromkeys(host_name(n) for n in listed if n.strip()))
    if ANY_HOST in names or (not names and not is_loopback(bind_host)):
        return (ANY_HOST,)
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, *names)))


def host_allowed(header: str | None, allowed: Collection[str]) -> bool:
    """Whether a request with this ``Host`` header may be answered: a name in ``allowed`` or a loopback IP literal
    (which no DNS answer can rebind); no header: only where any name may."""
    if ANY_HOST in allowed:
        return True
    if not header:
        return False
    host = host_name(header)
    return host in allowed or _is_loopback_ip(host)


def key_matches(authorization: str, key: str) -> bool:
    """Whether an ``Authorization`` header (as ASGI servers decode it: its bytes as Latin-1) carries ``key`` (sent
    as UTF-8) as a bearer token. The comparison takes the same time wherever the first difference is (the hashes
    have one length, so not even the key's length shows)."""
    scheme, _, sent = authorization.strip().partition(" ")
    digest = hashlib.sha256(sent.strip().encode("latin-1", "replace")).digest()
    wanted = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(digest, wanted) and scheme.lower() == "bearer"


def api_key(given: str | None, environ: Mapping[str, str]) -> str | None:
    """The key the server requires: ``--api-key`` when given, else ``$LMFORGE_API_KEY`` when set and not empty,
    else none."""
    return given if given is not None else (environ.get(API_KEY_ENV) or None)
