"""scripts/demo leaves nothing behind, and says what it proved.

The demo runs under a subreaper (``PR_SET_CHILD_SUBREAPER``), so a process it
leaves running, even one that detached itself (``setsid``, a daemon's double
fork), comes back to the wrapper instead of init and is counted. Before and
after, the test takes the namespaces, the root namespace's nft and legacy
iptables rules and interfaces, the labs' state files and the repository's
files; the demo's temporary files go to a directory of their own, which must
end empty.

The test runs the whole demo, every part ``sudo scripts/demo`` runs (README),
in about 60 s; since the suite runs in two workers (scripts/test) that fits
its share of the CI budget. ``NFGATE_DEMO_TEST_PARTS=filter,ftp`` (say) runs
some of them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from firewall.lab import netns
from firewall.lab import state as lab_state
from firewall.lab.topology import REPO
from tests.conftest import _claim as claim
from tests.conftest import _release as release

pytestmark = [pytest.mark.netns, pytest.mark.slow]

DEMO = REPO / "scripts" / "demo"
PARTS = os.environ.get("NFGATE_DEMO_TEST_PARTS", "filter,relay,smtp,ftp,rtp,tunnel").split(",")

# Runs argv as a subreaper; prints the demo's exit code and what it left running, as JSON.
SUBREAPER = r"""
import ctypes, json, os, signal, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
code = subprocess.run(sys.argv[1:]).returncode
left = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    if int(ppid) == os.getpid() and state != "Z":
        left.append(cmd)
        os.kill(int(pid), signal.SIGKILL)
while True:  # reap every orphan that came back to us
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
print(json.dumps({"code": code, "left": left}))
"""


def repo_files() -> set[str]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}
    out = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        out.update(os.path.relpath(os.path.join(root, f), REPO) for f in files)
    return out


def root_rules() -> str:
    text = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        if shutil.which(tool):
            out = subprocess.run([tool], capture_output=True, text=True).stdout
            text += "".join(ln + "\n" for ln in out.splitlines() if not ln.startswith("#"))
    return text


def snapshot(prefix: str) -> dict:
    # Other sessions' labs and benches come and go on a shared machine meanwhile, so
    # namespaces and lab states are the demo's own: every one it makes starts with PREFIX
    # (PREFIX-host, PREFIX-gw, and the tunnel's PREFIXt-host).
    return {
        "namespaces": {n for n in pr_netns.listnetns() if n.startswith(prefix)},
        "rules": root_rules(),
        "interfaces": {name for _, name in socket.if_nameindex()},
        "states": {s.prefix for s in lab_state.all_states() if s.prefix.startswith(prefix)},
        "files": repo_files(),
    }


@pytest.fixture
def demo_prefix(lab_prefix: str, request: pytest.FixtureRequest) -> str:
    # The tunnel part's lab is PREFIX + "t": claimed as this session's (or another
    # session's cleanup takes it for an orphan) and removed too if the demo leaves it.
    tunnel = f"{lab_prefix}t"
    claim(tunnel)

    def finalize() -> None:
        try:
            netns.cleanup(tunnel)
        finally:
            release(tunnel)

    request.addfinalizer(finalize)
    return lab_prefix


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """An empty directory with a short path: the demo's control sockets live under it (108 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="nfgd", dir="/tmp"))
    path.chmod(0o755)  # the smtp part's Postfix daemons run as user postfix, under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_demo_proves_each_part_and_leaves_nothing_behind(demo_prefix: str, short_tmp: Path) -> None:
    temp = short_tmp
    env = {**os.environ, "NFGATE_DEMO_PYTHON": sys.executable, "NFGATE_DEMO_PREFIX": demo_prefix,
           "TMPDIR": str(temp), "PYTHONDONTWRITEBYTECODE": "1"}
    before = snapshot(demo_prefix)
    res = subprocess.run([sys.executable, "-c", SUBREAPER, str(DEMO), "--only", ",".join(PARTS)],
                         capture_output=True, text=True, env=env, timeout=300)
    after = snapshot(demo_prefix)
    out = res.stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["code"] == 0, out + res.stderr
    for part in PARTS:
        assert f"\n== {part}: " in out, part
    assert out.count("\n   ok (") == len(PARTS) and "FAILED" not in out and "UNEXPECTED" not in out, out
    assert f"== result: {len(PARTS)} of {len(PARTS)} parts ok" in out
    # What the issue asks of the ftp and tunnel parts, as the demo shows them.
    if "ftp" in PARTS:
        assert "passive (PASV)" in out and "active (PORT)" in out and out.count("matches") == 2
        assert "the gateway said '501 " in out and "refused.bounce" in out
        assert "nfgate flows, during a download" in out and "nfgate status, during a download" in out
    if "tunnel" in PARTS:
        assert "the same URL answers again" in out

    assert report["left"] == [], "processes left running"
    assert list(temp.iterdir()) == [], "temporary files left"
    for key in ("namespaces", "rules", "interfaces", "states", "files"):
        assert after[key] == before[key], key


def test_an_unknown_part_is_a_usage_error() -> None:
    res = subprocess.run([str(DEMO), "--only", "ftp,nope"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "NFGATE_DEMO_PYTHON": sys.executable})
    assert res.returncode == 64
    assert "demo: no part 'nope'" in res.stderr and "parts: filter relay smtp ftp rtp tunnel" in res.stderr
