"""Simulated hosts on one machine: network namespaces joined by a bridge, each with its own address.

    with SimCluster(2) as c:
        p = c.popen(0, [...])          # a command inside host 0's namespace
        c.cut(1)                       # take host 1's link down

Host ``i`` is namespace ``datds_h{i}`` with address ``10.78.0.{i+1}/24`` on a veth whose other end sits in a bridge
in namespace ``datds_sw``: traffic only ever goes to addresses inside namespaces this harness made. Everything it
created is removed on exit, also when the code inside fails. Needs root (``ip netns``); ``available()`` says
whether it works here, so tests can skip with the reason.
"""

from __future__ import annotations

import os
import subprocess

SWITCH = "datds_sw"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    try:
        r = _ip("netns", "add", "datds_probe", check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"ip netns unavailable: {e}"
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", "datds_probe", check=False)
    return None


class SimCluster:
    def __init__(self, hosts: int):
        self.n = hosts
        self.ns = [f"datds_h{i}" for i in range(hosts)]
        self.addr = [f"10.78.0.{i + 1}" for i in range(hosts)]
        self.dev = [f"datds_e{i}" for i in range(hosts)]
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> SimCluster:
        self.teardown()
        try:
            _ip("netns", "add", SWITCH)
            _ip("-n", SWITCH, "link", "add", "br0", "type", "bridge")
            _ip("-n", SWITCH, "link", "set", "br0", "up")
            for i, (ns, dev, addr) in enumerate(zip(self.ns, self.dev, self.addr, strict=True)):
                _ip("netns", "add", ns)
                _ip(
                    "link",
                    "add",
                    dev,
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"datds_s{i}",
                    "netns",
                    SWITCH,
                )
                _ip("-n", SWITCH, "link", "set", f"datds_s{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
        self.teardown()

    def teardown(self) -> None:
        for ns in [*self.ns, SWITCH]:
            _ip("netns", "del", ns, check=False)

    def env(self, host: int, base: dict[str, str]) -> dict[str, str]:
        return dict(base, GLOO_SOCKET_IFNAME=self.dev[host])

    def popen(self, host: int, cmd: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside host ``host``'s namespace, in its own process group."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[host], *cmd],
            env=self.env(host, env),
            start_new_session=True,
            **kw,
        )
        self._procs.append(p)
        return p

    def cut(self, host: int) -> None:
        """Take the host's link down: its peers see silence, not a closed connection."""
        _ip("-n", self.ns[host], "link", "set", self.dev[host], "down")
