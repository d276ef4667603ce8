"""A guard that fails a test when anything tries to reach another machine (security issue 27).

:func:`install` wraps ``socket.socket.connect`` / ``connect_ex`` / ``sendto``, ``socket.create_connection``,
``socket.getaddrinfo`` and ``socket.gethostbyname``: a call that names a non-loopback address (or a host
name other than localhost and this machine's own name) raises :class:`SocketGuardError` *and* is
recorded, so a test still fails when the code under test swallows the exception (``tests/conftest.py``
asserts the record is empty after each test). Loopback, the unspecified address, AF_UNIX and every other
non-IP family keep working: torchrun and gloo connect to 127.0.0.1.

Subprocesses get the same guard from ``sitecustomize.py`` in this folder (:func:`child_environment` puts
the folder on the child's PYTHONPATH): there a violation is also appended to the file named by the
``SOCKET_GUARD_MARKER`` environment variable, which the parent test asserts does not exist.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import traceback
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
MARKER_VARIABLE = "SOCKET_GUARD_MARKER"
LOCAL_NAMES = frozenset({"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class SocketGuardError(RuntimeError):
    """Something tried to open a connection to (or resolve) a host other than this machine."""


attempts: list[str] = []
_originals: dict[str, object] = {}


def _is_local(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip().lower().rstrip(".")
    if name in LOCAL_NAMES or name == socket.gethostname().lower():
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what: str) -> None:
    stack = "".join(traceback.format_stack(limit=12)[:-2])
    attempts.append(f"{what}\n{stack}")
    marker = os.environ.get(MARKER_VARIABLE)
    if marker:
        with open(marker, "a") as file:
            file.write(f"{what}\n{stack}\n")
    raise SocketGuardError(f"socket guard: {what} (the test run may not reach the network)")


def _check_address(family: int, address: object, what: str) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return  # AF_UNIX, AF_NETLINK, ...: never another machine
    host = address[0] if isinstance(address, tuple) and address else address
    if not _is_local(host):
        _refuse(f"{what} to {address!r}")


def install() -> None:
    """Wrap the socket functions (idempotent)."""
    if _originals:
        return
    cls = socket.socket
    _originals.update(
        connect=cls.connect,
        connect_ex=cls.connect_ex,
        sendto=cls.sendto,
        create_connection=socket.create_connection,
        getaddrinfo=socket.getaddrinfo,
        gethostbyname=socket.gethostbyname,
        gethostbyname_ex=socket.gethostbyname_ex,
    )

    def connect(self, address):
        _check_address(self.family, address, "socket.connect")
        return _originals["connect"](self, address)

    def connect_ex(self, address):
        _check_address(self.family, address, "socket.connect_ex")
        return _originals["connect_ex"](self, address)

    def sendto(self, data, *args):
        _check_address(self.family, args[-1] if args else None, "socket.sendto")
        return _originals["sendto"](self, data, *args)

    def create_connection(address, *args, **kwargs):
        if not _is_local(address[0]):
            _refuse(f"socket.create_connection to {address!r}")
        return _originals["create_connection"](address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            _refuse(f"socket.getaddrinfo of {host!r}")
        return _originals["getaddrinfo"](host, *args, **kwargs)

    def gethostbyname(host):
        if not _is_local(host):
            _refuse(f"socket.gethostbyname of {host!r}")
        return _originals["gethostbyname"](host)

    def gethostbyname_ex(host):
        if not _is_local(host):
            _refuse(f"socket.gethostbyname_ex of {host!r}")
        return _originals["gethostbyname_ex"](host)

    cls.connect, cls.connect_ex, cls.sendto = connect, connect_ex, sendto
    socket.create_connection, socket.getaddrinfo = create_connection, getaddrinfo
    socket.gethostbyname, socket.gethostbyname_ex = gethostbyname, gethostbyname_ex


def take_attempts() -> list[str]:
    """The attempts recorded since the last call (and forget them)."""
    taken = attempts[:]
    attempts.clear()
    return taken


def child_environment(marker: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) for a child Python process guarded by sitecustomize.py:
    a blocked attempt is appended to ``marker``."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FOLDER), env.get("PYTHONPATH", "")]))
    env[MARKER_VARIABLE] = str(marker)
    return env
