"""Fixtures shared by the whole suite: labs of network namespaces, and root checks.

- Tests marked ``netns`` are skipped, with the reason, when not run as root
  or when the iproute2 ``ip`` tool is missing.
- ``lab_factory("basic")`` builds a topology with a unique prefix
  (``nfgt`` + 5 hex digits) and removes it when the test ends, passed or
  failed, or when the build itself failed half way.
- ``module_lab_factory`` is the same with labs shared by a whole module.
- ``lab_prefix`` is such a prefix on its own, for a lab built another way
  (say ``nfgate lab up --prefix``), removed the same way.
- At the end of the session, any ``nfgt*`` lab still present whose owner is
  this session or a dead one is removed. Engineers run suites side by side on
  one machine, and ``scripts/test`` runs two pytest-xdist workers (each its
  own session here, with its own pid), so a lab that belongs to another live
  pytest is left alone.
  The owner is the one ``lab up`` records in the lab's state file
  (``firewall.lab.state``): this session sets ``$NFGATE_LAB_OWNER_PID`` to its
  pid, so the labs its ``nfgate lab up`` calls build are its own too. Each
  prefix is also claimed in ``/run/nfgate-test-labs/<prefix>``, for the
  sessions of checkouts whose cleanup reads only that (and for a lab with no
  state file yet).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import pytest

from firewall.lab import state as lab_state
from firewall.lab.netns import Lab, cleanup, lab_namespaces, split_namespace
from firewall.lab.topology import Topology, load_topology

TEST_PREFIX = "nfgt"
OWNERS = Path("/run/nfgate-test-labs")
# Every lab this session builds, in process or through `nfgate lab up`, is owned by it.
os.environ[lab_state.OWNER_PID_ENV] = str(os.getpid())


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "netns test: needs root to build network namespaces (run scripts/test as root)"
    if shutil.which("ip") is None:
        return "netns test: needs the iproute2 'ip' tool (apt-get install iproute2)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _netns_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own, which would answer first
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """scripts/test's ``--dist loadfile``, with the VM tests' files as one scope: each worker that
    holds one of them boots the qemu guest, which runs every registered check (tests/vm/harness.py,
    about 2 minutes on both CPUs), so they go to one worker together."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndTheVm(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/vm/" if path.startswith("tests/vm/") else path

    return FilesAndTheVm(config, log)  # type: ignore[arg-type]


def _claim(prefix: str) -> None:
    OWNERS.mkdir(mode=0o700, exist_ok=True)
    (OWNERS / prefix).write_text(f"{os.getpid()}\n")


def _release(prefix: str) -> None:
    (OWNERS / prefix).unlink(missing_ok=True)


def _orphaned(prefix: str) -> bool:
    """True if the lab belongs to this session, to a dead one, or to nobody we know."""
    try:
        pid = int((OWNERS / prefix).read_text().strip())
    except (OSError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A recycled pid makes us keep a dead session's lab: a leak, never a
    # lab pulled from under a live test.
    return False


def new_test_prefix() -> str:
    return f"{TEST_PREFIX}{secrets.token_hex(3)[:5]}"


@pytest.fixture
def lab_prefix(request: pytest.FixtureRequest) -> str:
    """A fresh ``nfgt*`` prefix owned by this session, for labs built some other
    way (``nfgate lab up --prefix``); whatever uses it is removed at teardown."""
    prefix = new_test_prefix()
    _claim(prefix)

    def finalize() -> None:
        try:
            cleanup(prefix)
        finally:
            _release(prefix)

    request.addfinalizer(finalize)
    return prefix


def _factory(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    def make(topology: str | os.PathLike[str] | Topology = "basic", prefix: str | None = None) -> Lab:
        topo = topology if isinstance(topology, Topology) else load_topology(topology)
        lab = Lab(topo, prefix or new_test_prefix())
        _claim(lab.prefix)

        def finalize() -> None:
            try:
                lab.down()
            finally:
                _release(lab.prefix)

        # Registered before up(), so that a half-built lab is removed too.
        request.addfinalizer(finalize)
        return lab.up()

    return make


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    """``lab_factory(topology="basic", prefix=None) -> Lab`` that is up.

    ``topology`` is a name, a path or a Topology. The lab is removed at
    teardown even if the test, or ``up()`` itself, fails.
    """
    return _factory(request)


@pytest.fixture(scope="module")
def module_lab_factory(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    """``lab_factory`` whose labs live until the module's last test: for
    read-only checks that can share one lab."""
    return _factory(request)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() != 0:
        return
    # The labs found by their state files: their owner says whose they are.
    for state in lab_state.all_states():
        if state.prefix.startswith(TEST_PREFIX) and (state.owner.pid == os.getpid() or not state.owner.alive()):
            try:
                cleanup(state.prefix)
            finally:
                _release(state.prefix)
    # Test labs without a state file (a crash before it was written, or an older checkout's).
    prefixes = set()
    for name in lab_namespaces():
        parts = split_namespace(name)
        if parts and parts[0].startswith(TEST_PREFIX) and lab_state.read(parts[0]) is None:
            prefixes.add(parts[0])
    for prefix in sorted(prefixes):
        if _orphaned(prefix):
            try:
                cleanup(prefix)
            finally:
                _release(prefix)
    # Owner files of crashed sessions whose namespaces are already gone.
    if OWNERS.is_dir():
        for path in OWNERS.iterdir():
            if path.name not in prefixes and _orphaned(path.name):
                _release(path.name)
