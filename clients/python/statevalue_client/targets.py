"""gRPC target strings: which name several replicas, and the address of each replica."""

from __future__ import annotations

import socket

# gRPC's default port for dns: targets without one.
_DEFAULT_PORT = 443


def is_multi_address(target: str) -> bool:
    """Whether ``target`` may name several servers (dns:, ipv4: or ipv6: targets)."""
    return target.startswith(("dns:", "ipv4:", "ipv6:"))


def _split_host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    return host, int(port) if port else _DEFAULT_PORT


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def replica_addresses(target: str) -> list[str]:
    """Every server address behind ``target``, each usable as a gRPC target of its own.

    ``dns:[//authority/]host:port`` resolves the name now (a Kubernetes headless service
    gives one address per ready pod); ``ipv4:a:p,b:p`` and ``ipv6:[a]:p,...`` list theirs;
    any other target is one server.

    Raises:
        ValueError: a dns: name that does not resolve.
    """
    if target.startswith(("ipv4:", "ipv6:")):
        listed = target.split(":", 1)[1].split(",")
        return list(dict.fromkeys(_join(*_split_host_port(a.strip())) for a in listed))
    if not target.startswith("dns:"):
        return [target]
    name = target[len("dns:") :]
    if name.startswith("//"):
        name = name[2:].partition("/")[2]
    host, port = _split_host_port(name)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"{target}: cannot resolve {host!r}: {exc}") from exc
    return list(dict.fromkeys(_join(str(info[4][0]), port) for info in infos))
