"""Two "nodes" on one machine: two network namespaces joined by a veth pair, for multi-node tests.

``two_nodes()`` yields a ``Node`` per namespace (name, address, veth interface); ``node.cmd(argv)``
prefixes ``ip netns exec``. The veth ends are created straight inside the namespaces (never in the
host's), and each namespace sees only its loopback and its veth end, so the test's traffic cannot
leave them. Leaving the block (also on an error) kills every process still in the namespaces and
deletes them, which destroys the veth pair. Namespace names carry the creating pid; namespaces of
this prefix whose creator is gone (a test killed before its cleanup) are deleted on entry.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

PREFIX = "kd2n"
SUBNET = "10.77.0"
# iproute2's ip; /usr/sbin is often missing from a non-root PATH
IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


@dataclass(frozen=True)
class Node:
    ns: str         # network namespace
    addr: str       # this node's address on the veth link
    ifname: str     # this node's veth end (GLOO_SOCKET_IFNAME)

    def cmd(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.ns, *argv]

    def veth_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes on this node's veth end."""
        base = f"/sys/class/net/{self.ifname}/statistics"
        out = _ip("netns", "exec", self.ns, "cat", f"{base}/rx_bytes", f"{base}/tx_bytes").split()
        return int(out[0]), int(out[1])


def _ip(*args: str) -> str:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {(proc.stderr or proc.stdout).strip()} (exit {proc.returncode})")
    return proc.stdout


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (missing tool or privilege), or None."""
    if IP is None:
        return "the `ip` command (iproute2) is missing: apt-get install iproute2, or `make test-two-nodes`"
    if os.geteuid() != 0 and not _has_net_admin():
        return "network namespaces need root or CAP_NET_ADMIN + CAP_SYS_ADMIN (`ip netns add`); run as root"
    probe = f"{PREFIX}-{os.getpid()}-probe-{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b")
    except OSError as e:
        return f"cannot make a network namespace with a veth pair here: {e}"
    finally:
        remove(probe)
    return None


def _has_net_admin() -> bool:
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 12))      # CAP_NET_ADMIN
    return False


def _ours() -> list[str]:
    names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"{PREFIX}-\d+-\w+(-\w+)?", n)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove(ns: str) -> None:
    """Kill what still runs in ``ns`` (SIGTERM, then SIGKILL), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            pids = [int(p) for p in _ip("netns", "pids", ns).split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 5
            while pids and time.time() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)
    with contextlib.suppress(OSError):
        _ip("netns", "del", ns)


def clean_stale() -> None:
    """Delete namespaces of this prefix whose creating process is gone."""
    for ns in _ours():
        if not _alive(int(ns.split("-")[1])):
            remove(ns)


@contextlib.contextmanager
def two_nodes():
    """Yield (node_a, node_b): namespaces ``kd2n-PID-TAG-a|b`` at 10.77.0.1/24 and 10.77.0.2/24."""
    clean_stale()
    tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    a = Node(f"{tag}-a", f"{SUBNET}.1", "veth-a")
    b = Node(f"{tag}-b", f"{SUBNET}.2", "veth-b")
    made = []
    try:
        for node in (a, b):
            _ip("netns", "add", node.ns)
            made.append(node.ns)
        # created inside the namespaces: the names never exist in the host's, so runs cannot collide
        _ip("link", "add", "name", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
        for node in (a, b):
            _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
            _ip("-n", node.ns, "link", "set", node.ifname, "up")
            _ip("-n", node.ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in made:
            remove(ns)
