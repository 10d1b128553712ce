"""kd-train as a 2-node torchrun job on one machine, against its one-node self-launch.

The two "nodes" are network namespaces joined by a veth pair (``netns.two_nodes``): 10.77.0.1 (node A)
and 10.77.0.2 (node B), each seeing only its loopback and its veth end, one rank each. They share the
filesystem, as a cluster's nodes share theirs: rank 0 alone writes the run's logs and reports, each
rank its own checkpoint files. Each node runs what a user runs on each host of a cluster:

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 10.77.0.1:29400
             --rdzv-id ID --local-addr <this node's address> -m train RECIPE overrides

What multi-node needs that one node hides (here every node has the same host name, resolving to
127.0.0.1, and so do badly configured clusters):
  --local-addr            torchrun publishes this address as the master's (MASTER_ADDR) and orders
                          the nodes by it; without it MASTER_ADDR is ``localhost`` and node B's rank
                          cannot reach rank 0
  --rdzv-conf is_host=    which node's torchrun hosts the rendezvous store: torchrun guesses from the
                          host name, and the guess (127.0.0.1 is not 10.77.0.1) makes nobody host it
  GLOO_SOCKET_IFNAME      the interface gloo binds and advertises; without it gloo takes the host
                          name's address, 127.0.0.1, and the ranks cannot connect to each other
Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; skipped with the reason otherwise.
`make test-two-nodes` installs iproute2 where it is missing and runs this file."""
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from . import netns
from .conftest import LAUNCH_COMMON, REPO, metrics

pytestmark = pytest.mark.dist

BIN = Path(sys.executable).parent
COMMON = list(LAUNCH_COMMON)
RDZV_PORT = 29400       # any port: nothing else listens in a namespace made for this test
TIMEOUT = 300


def _torchrun(node: netns.Node, master: netns.Node, recipe: Path, log: Path) -> subprocess.Popen:
    """torchrun on ``node``, one rank; ``master``'s torchrun hosts the rendezvous store."""
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "0",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master.addr}:{RDZV_PORT}",
           "--rdzv-id", f"kd-{os.getpid()}", "--rdzv-conf", f"is_host={str(node == master).lower()},join_timeout=120",
           "--local-addr", node.addr, "-m", "train", str(recipe), "run_name=two-nodes", *COMMON]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": node.ifname,
           "TP_SOCKET_IFNAME": node.ifname, "LOGLEVEL": "INFO"}     # INFO: torchrun logs the rendezvous result
    with open(log, "w") as out:     # files, not pipes: a full pipe would stall one node while we wait on the other
        return subprocess.Popen(node.cmd(cmd), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun's process group (torchrun passes it to its rank), SIGKILL after 15 s."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _rendezvous(log: str) -> dict:
    """The rendezvous result torchrun logged: the MASTER_ADDR, GROUP_RANK, LOCAL_RANK and RANK it gave its rank."""
    found = {k: re.search(rf"\b{k}=(\S+)", log) for k in
             ("master_addr", "group_rank", "group_world_size", "local_ranks", "global_ranks")}
    return {k: m.group(1) if m else None for k, m in found.items()}


def test_two_nodes_equal_self_launch(kd_setup, self_launched, tmp_path):
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    recipe = kd_setup / "recipe.yaml"
    expected = self_launched

    logs = {"A": tmp_path / "node-a.log", "B": tmp_path / "node-b.log"}
    with netns.two_nodes() as (a, b):       # leaving it kills what is left in the namespaces and removes them
        procs = {}
        try:
            procs["A"] = _torchrun(a, a, recipe, logs["A"])
            procs["B"] = _torchrun(b, a, recipe, logs["B"])
            deadline = time.monotonic() + TIMEOUT
            codes = {n: p.poll() for n, p in procs.items()}
            # until both are done; one node failing leaves the other waiting for it (rendezvous, collectives,
            # torchrun's exit barrier) for minutes, so the first failure ends the wait
            while time.monotonic() < deadline and None in codes.values() and set(codes.values()) <= {None, 0}:
                time.sleep(0.5)
                codes = {n: p.poll() for n, p in procs.items()}
            veth = {"A": a.veth_bytes(), "B": b.veth_bytes()}
        finally:
            for p in procs.values():
                _stop(p)
    out = {n: log.read_text(errors="replace") for n, log in logs.items()}
    report = "\n".join(f"--- node {n} (exit {codes[n]}), tail of {logs[n]}\n{out[n][-5000:]}" for n in out)
    assert codes == {"A": 0, "B": 0}, (f"torchrun exit codes {codes} (None: still running after {TIMEOUT} s, "
                                       f"or stopped when the other node failed)\n{report}")

    # the job really spanned the two namespaces: torchrun gave node A's rank RANK 0 and node B's RANK 1,
    # each LOCAL_RANK 0, both MASTER_ADDR 10.77.0.1, and the collectives' bytes crossed the veth
    for n, rank in (("A", "0"), ("B", "1")):
        assert _rendezvous(out[n]) == {"master_addr": a.addr, "group_rank": rank, "group_world_size": "2",
                                       "local_ranks": "[0]", "global_ranks": f"[{rank}]"}, f"node {n}\n{report}"
    for n, (rx, tx) in veth.items():
        # ~2-3 MB each way for 3 steps of the tiny models; the rendezvous alone moves ~2 KB
        assert rx > 100_000 and tx > 100_000, f"node {n}'s veth moved only {rx} B in, {tx} B out\n{report}"

    run = kd_setup / "runs" / "two-nodes"      # on the filesystem both nodes share
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3], "one metrics row per step: rank 0 alone writes the shared run"
    saved = sorted(p.name for p in (run / "checkpoints" / "step_00000003").glob("trainer_state_rank*.pt"))
    assert saved == ["trainer_state_rank0.pt", "trainer_state_rank1.pt"], "each node's rank saves its own state"
    assert [r["loss"] for r in rows] == pytest.approx(expected, rel=1e-5)
