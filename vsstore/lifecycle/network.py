"""A guest's network: a namespace of its own with loopback up (or the host's, with
``spaces/hostnet``), and a veth pair per configured interface: the host's side made and
routed by the monitor, the guest's side configured in the new namespace (with the host's
``ip``, before the guest's root is entered)."""

from __future__ import annotations

import os
import subprocess

from vsstore.errors import (
    ConfigError,
)

from . import ns
from .guestconf import GuestConfig, Interface

HOSTNET_WARNING = (
    "spaces/hostnet: the guest shares the host's network namespace (its "
    "interfaces, services on 127.0.0.1, abstract unix sockets); remove the file "
    "to give it a network of its own"
)


def unshare(cfg: GuestConfig, flags: int) -> None:  # pragma: no cover - in a child
    """Unshare ``flags`` and a network namespace of the guest's own, its loopback up
    (interfaces come later), unless the configuration asks for the host's network
    (spaces/hostnet)."""
    if cfg.hostnet:
        ns.unshare(flags)
        return
    ns.unshare(flags | ns.CLONE_NEWNET)
    ns.link_up("lo")


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise ConfigError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _host_dev(cfg: GuestConfig, i: int) -> str:
    base = f"vs{cfg.context or ''}{cfg.name}"[:11]
    return f"{base}.{i}"


def links(cfg: GuestConfig) -> list[list[Interface]]:
    """The guest's interfaces grouped by name: one veth pair per name, with every address
    configured for it (util-vserver's several addresses on one ``dev``)."""
    out: dict[str, list[Interface]] = {}
    for itf in cfg.interfaces:
        out.setdefault(itf.name, []).append(itf)
    return list(out.values())


def host_side(cfg: GuestConfig, pid: int) -> list[str]:
    """The host's side of each configured interface: a veth pair, its peer moved into the
    guest's network namespace, a route to each of the guest's addresses on it (or the
    host address)."""
    made = []
    try:
        for i, addrs in enumerate(links(cfg)):
            host, peer = _host_dev(cfg, i), f"vsp{pid}.{i}"[:15]
            _ip("link", "add", host, "type", "veth", "peer", "name", peer)
            made.append(host)
            _ip("link", "set", peer, "netns", str(pid))
            for itf in addrs:
                if itf.host_ip is not None:
                    _ip("addr", "add", f"{itf.host_ip}/{itf.ip.network.prefixlen}", "dev", host)
            _ip("link", "set", host, "up")
            for itf in addrs:
                if itf.host_ip is None:
                    _ip("route", "add", str(itf.ip.ip), "dev", host)
    except ConfigError:
        for d in made:
            subprocess.run(["ip", "link", "del", d], capture_output=True)
        raise
    return made


def guest_side(cfg: GuestConfig) -> None:
    """Inside the new network namespace (the host's ``ip``, never the guest's)."""
    default = False
    for i, addrs in enumerate(links(cfg)):
        peer = f"vsp{os.getpid()}.{i}"[:15]
        name = addrs[0].name
        _ip("link", "set", peer, "name", name)
        for itf in addrs:
            bcast = ["broadcast", str(itf.broadcast)] if itf.broadcast is not None else []
            _ip("addr", "add", str(itf.ip), *bcast, "dev", name)
        _ip("link", "set", name, "up")
        for itf in addrs:
            if itf.host_ip is not None and not default:
                _ip("route", "add", "default", "via", str(itf.host_ip))
                default = True
