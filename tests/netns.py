"""Hosts made of Linux network namespaces, for multi-node tests without a cluster.

``HostNetwork(n)`` creates ``n`` namespaces ("hosts") plus one switch namespace holding a bridge;
each host gets one veth port on the bridge with the address ``10.231.7.<i>/24`` (on an interface
named ``trm0``, not ``eth0``, so nothing can work by a default interface name), a loopback, its
own hostname (``trm-h<i>``, set in a UTS namespace per command) and an ``/etc/hosts`` of its own
that ``ip netns exec`` bind-mounts from ``/etc/netns/<namespace>/hosts``. Like a Debian install
next to a DNS, that file resolves the other hosts' names to their addresses but the host's own
name to 127.0.1.1 only: software that trusts ``gethostname()`` to find its own address gets
loopback, and a host does not recognise its bridge address as "its name". There is no route out of the subnet and the bridge is not in the
machine's namespace: traffic stays between these hosts.

``close()`` kills every process in the namespaces and deletes them, their veths and hosts files;
``HostNetwork`` also removes the leftovers of a crashed earlier run before it creates anything.
Needs root and iproute2 (``usable()`` says why not).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

PREFIX = "trmh"  # every namespace this module creates: trmh-sw, trmh-h1, trmh-h2, ...
SUBNET = "10.231.7"  # a private /24 that exists only on the switch namespace's bridge
INTERFACE = "trm0"  # each host's interface on the bridge
NETNS_ETC = Path("/etc/netns")


def usable() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2 / util-linux) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def namespaces() -> list[str]:
    """The namespaces of this module that exist now."""
    listing = _ip("netns", "list").stdout.split()
    return [name for name in listing if name.startswith(PREFIX + "-")]


def kill_namespace_processes(namespace: str) -> list[int]:
    """SIGKILL every process inside ``namespace`` (what a machine that dies does to its jobs)."""
    pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove_all() -> None:
    """Delete every namespace and hosts file of this module (also those of a crashed run)."""
    for name in namespaces():
        kill_namespace_processes(name)
        _ip("netns", "delete", name, check=False)
    for leftover in NETNS_ETC.glob(PREFIX + "-*") if NETNS_ETC.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass(frozen=True)
class Host:
    index: int  # 1..n

    @property
    def namespace(self) -> str:
        return f"{PREFIX}-h{self.index}"

    @property
    def hostname(self) -> str:
        return f"trm-h{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    def command(self, argv: list[str], private_dirs: tuple[Path, ...] = ()) -> list[str]:
        """``argv`` as run on this host: in its network namespace, under its hostname, and with
        each of ``private_dirs`` replaced by an empty tmpfs that only this command sees (a
        directory that is not shared with the other hosts)."""
        mounts = "".join(f"mount -t tmpfs trm-private {shlex.quote(str(d))} && " for d in private_dirs)
        script = f'hostname "$0" && {mounts}exec "$@"'
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--", "sh", "-c", script,
                self.hostname, *argv]

    def kill_all(self) -> list[int]:
        return kill_namespace_processes(self.namespace)


class HostNetwork:
    """``n`` hosts on one bridge; use as a context manager or call ``close()``."""

    def __init__(self, n: int = 2):
        reason = usable()
        if reason is not None:
            raise RuntimeError(reason)
        remove_all()
        self.hosts = [Host(i) for i in range(1, n + 1)]
        self.switch = f"{PREFIX}-sw"
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            port = f"port{host.index}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", INTERFACE,
                "netns", host.namespace)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            _ip("-n", host.namespace, "link", "set", INTERFACE, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            etc = NETNS_ETC / host.namespace
            etc.mkdir(parents=True, exist_ok=True)
            peers = "".join(f"{h.address} {h.hostname}\n" for h in self.hosts if h != host)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.hostname}\n{peers}")

    def close(self) -> None:
        remove_all()

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
