"""Run a Python program with every outbound network connection recorded and refused (loopback ones are allowed).

    python tests/network_guard.py LOG program.py [args...]

Before the program starts, socket.socket.connect / connect_ex / sendto and socket.getaddrinfo are wrapped: a call
that would reach an address outside this machine (not loopback, not a Unix socket) or look up a host name other than
localhost appends one JSON line to LOG and raises OSError (socket.gaierror for a lookup), so nothing leaves the
machine. LOG's first line, {"guard": "installed"}, shows the guard ran in that process.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import runpy
import socket
import sys
from pathlib import Path

LOG = sys.argv[1]
_connect, _connect_ex, _sendto, _getaddrinfo = (socket.socket.connect, socket.socket.connect_ex,
                                                socket.socket.sendto, socket.getaddrinfo)


def _record(**entry) -> None:
    with open(LOG, "a") as log:
        log.write(json.dumps(entry) + "\n")


def is_local(host) -> bool:
    """Whether `host` (an address or a name) is this machine: loopback, unspecified or localhost."""
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    host = host.split("%")[0].strip("[]")
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: looking it up is already a network request
    return address.is_loopback or address.is_unspecified


def _outbound(sock, address) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not is_local(address[0])


def _refuse(call: str, address):
    _record(call=call, address=repr(address))
    return OSError(errno.ENETUNREACH, f"outbound network access refused by tests/network_guard.py: {address!r}")


def connect(self, address):
    if _outbound(self, address):
        raise _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if _outbound(self, address):
        _refuse("connect_ex", address)
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def sendto(self, data, *args):
    address = args[-1]
    if _outbound(self, address):
        raise _refuse("sendto", address)
    return _sendto(self, data, *args)


def getaddrinfo(host, *args, **kwargs):
    if not is_local(host):
        _refuse("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, f"name lookup refused by tests/network_guard.py: {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
socket.getaddrinfo = getaddrinfo
_record(guard="installed")
program = sys.argv[2]
sys.argv = sys.argv[2:]
sys.path[0] = str(Path(program).resolve().parent)  # as `python program.py` would
runpy.run_path(program, run_name="__main__")
