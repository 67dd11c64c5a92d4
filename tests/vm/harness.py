"""Run commands inside Debian's stock kernel, booted under qemu by virtme-ng.

Why: the hosts' kernel lacks the nft ``queue`` expression, Debian's stock kernel
has it (../shared/PEERS.md, "A stock kernel in a VM"). virtme-ng boots that kernel
with the host's root filesystem shared read-only into the guest, so the guest runs
the host's nft, ip and venv python; only a ``--rwdir`` folder carries results back.

Two levels of API:

``run_in_vm(script, timeout)``
    Boots once, runs a bash script as root in the guest, returns
    ``VmResult(log, rc, ...)``. ``log`` is the script's output, ``rc`` its exit
    status, read from the rwdir (``vng`` itself exits 255 here: the host has no
    udevd and the guest's exit code does not come back). Pass ``out=`` to keep
    the rwdir, so the script can leave files there for the host to read; the
    script finds that folder in ``$VM_OUT``.

``register(GuestCheck(...))`` at import time, then ``batch()`` from a test
    Boots ONE guest per pytest process for all registered checks, whatever
    module registered them: software emulation costs ~20 s per boot, so there is
    never one VM per test. Each check gets its own folder (``$VM_OUT/<name>``),
    prepared on the host by its ``prepare`` callable just before the boot, and
    its own time limit inside the guest; the checks run side by side on the
    guest's CPUs (the host's), so each keeps to namespaces and names of its
    own. ``batch()`` returns
    ``{name: CheckResult}``; the first call boots, later calls reuse the result.

Both skip the calling test (``pytest.skip`` with the reason) when the run cannot
happen here: not root, no qemu-system-x86_64, no vng, or no kernel from
``scripts/vmkernel`` (fetched on first use). Everything is bounded: on timeout
the whole process group of vng, virtme-run and qemu is killed. The batch folder
is removed when pytest exits, unless ``NFGATE_VM_KEEP=1`` is set.

Guest facts this relies on: virtme-ng shares the host's root filesystem
read-only (``/tmp``, ``/etc``, ``/var``... get a throw-away overlay), so only the
rwdir carries anything back; the guest runs as root with the host's nft, ip and
venv; ``--disable-kvm`` is required here (the nested /dev/kvm hangs the boot);
``--busybox`` points at the static busybox that scripts/vmkernel unpacks, which
virtme-ng needs to build the initramfs for a modular stock kernel.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
VMKERNEL = REPO / "scripts" / "vmkernel"
VENV_BIN = Path(sys.executable).parent
# The guest runs the same interpreter as the host's pytest: it sees the host's
# root filesystem, venv included.
GUEST_PYTHON = sys.executable
# Guest memory; 1G is what the recipe was proven with.
MEMORY = "1G"
# Time the guest needs to boot and to shut down in software emulation, on top
# of the checks' own limits (seen: ~17 s boot plus shutdown on 2 vCPUs).
BOOT_ALLOWANCE = 60.0
# What the test modules give ``batch()``: the first to call it boots for every check, so
# one bound for all (the checks' own limits cut it down; a loaded host boots slowly).
BATCH_TIMEOUT = 900.0
# Time scripts/vmkernel may take (a ~70 MB download and unpack on first use).
FETCH_TIMEOUT = 600.0

_RC_LINE = re.compile(r"^rc=(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class VmResult:
    """What one guest boot left behind.

    log: the script's stdout and stderr, as written to the rwdir.
    rc: the script's exit status; -1 if the guest never reported one (no boot,
        kernel panic, or timed out).
    console: vng's own output (boot messages, qemu errors), for diagnosis.
    seconds: wall time of the vng run.
    timed_out: the run hit its timeout and the VM was killed.
    out: the rwdir, when the caller asked to keep it (``out=``), else None.
    """

    log: str
    rc: int
    console: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    out: Path | None = None


@dataclass(frozen=True)
class GuestCheck:
    """One check that runs inside the shared guest boot.

    name: folder name under the batch rwdir, and key in ``batch()``'s result.
    argv: the command run as root in the guest. ``{out}`` in any argument is
        replaced by the check's own folder, ``{python}`` by the venv's python.
    timeout: seconds the check may run in the guest before ``timeout`` kills it.
    prepare: called on the host with the check's folder before the boot, to
        write inputs there (rulesets, parameters). Exceptions fail the check, not
        the batch.
    """

    name: str
    argv: tuple[str, ...]
    timeout: float
    prepare: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class CheckResult:
    """What one guest check left behind.

    rc: its exit status in the guest (124 when the guest's ``timeout`` killed
        it, -1 when it never ran or never reported).
    log: its stdout and stderr.
    out: its folder, where it may have written more files for the host.
    vm: the boot it ran in (shared by every check of the batch).
    """

    rc: int
    log: str
    out: Path
    vm: VmResult = field(repr=False)


class VmUnavailable(Exception):
    """The guest cannot be booted here; the message says why in one line."""


def _require_tools() -> tuple[Path, Path]:
    """Return (vmlinuz, busybox), fetching the kernel if need be, or raise VmUnavailable."""
    if os.geteuid() != 0:
        raise VmUnavailable("VM tests need root (the guest runs as root on the host's filesystem)")
    if shutil.which("qemu-system-x86_64") is None:
        raise VmUnavailable("qemu-system-x86_64 not found (Debian package qemu-system-x86; run scripts/setup)")
    if shutil.which("vng", path=_guest_path()) is None:
        raise VmUnavailable(f"vng not found in {VENV_BIN} or PATH (pip install virtme-ng; run scripts/setup)")
    try:
        proc = subprocess.run(
            [str(VMKERNEL)], capture_output=True, text=True, timeout=FETCH_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VmUnavailable(f"scripts/vmkernel: {err}") from err
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise VmUnavailable(f"scripts/vmkernel: {lines[-1]}")
    vmlinuz = Path(proc.stdout.strip().splitlines()[-1])
    busybox = vmlinuz.parent.parent / "bin" / "busybox"
    if not vmlinuz.is_file() or not os.access(busybox, os.X_OK):
        raise VmUnavailable(f"scripts/vmkernel gave {vmlinuz}, but it or {busybox} is missing")
    return vmlinuz, busybox


def _guest_path() -> str:
    """PATH with the venv's bin first: vng runs virtme-run through PATH."""
    return os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])


def _boot(out: Path, timeout: float) -> VmResult:
    """Boot the guest once to run ``out/script.sh``; the VM is killed at ``timeout``."""
    vmlinuz, busybox = _require_tools()
    q_out = shlex.quote(str(out))
    # The guest's exit status does not come back through vng here: the script's
    # output and status go to the rwdir instead.
    guest_cmd = (
        f"export VM_OUT={q_out} PYTHONDONTWRITEBYTECODE=1; "
        f"bash {q_out}/script.sh > {q_out}/log 2>&1; echo rc=$? >> {q_out}/log"
    )
    argv = [
        "vng",
        "--disable-kvm",  # /dev/kvm here is nested KVM that hangs a stock kernel's boot
        "--busybox", str(busybox),
        "--run", str(vmlinuz),
        "--memory", MEMORY,
        "--rwdir", str(out),
        "--exec", guest_cmd,
    ]
    env = dict(os.environ, PATH=_guest_path())
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile() as console_file:
        # A session of its own, so that a timeout kills vng, virtme-run and qemu
        # together, and nothing else.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=console_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        console_file.seek(0)
        console = console_file.read().decode(errors="replace")
    seconds = time.monotonic() - started
    log_path = out / "log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    rcs = _RC_LINE.findall(log)
    rc = int(rcs[-1]) if rcs else -1
    return VmResult(log=log, rc=rc, console=console, seconds=seconds, timed_out=timed_out)


def run_in_vm(script: str, timeout: float, out: Path | None = None) -> VmResult:
    """Run a bash ``script`` as root in one fresh guest boot, bounded by ``timeout`` seconds.

    With ``out`` (an existing folder), the rwdir is that folder and is kept, so
    the script can leave files in ``$VM_OUT``; otherwise a temporary folder is
    used and removed. Skips the calling test when no VM can be booted here.
    """
    keep = out is not None
    folder = Path(out) if keep else Path(tempfile.mkdtemp(prefix="nfgate-vm-"))
    try:
        (folder / "log").unlink(missing_ok=True)
        (folder / "script.sh").write_text(script)
        try:
            result = _boot(folder, timeout)
        except VmUnavailable as err:
            pytest.skip(str(err))
        if keep:
            return VmResult(
                log=result.log, rc=result.rc, console=result.console,
                seconds=result.seconds, timed_out=result.timed_out, out=folder,
            )
        return result
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


# --- one boot for every registered check -----------------------------------

_registry: dict[str, GuestCheck] = {}
_batch_results: dict[str, CheckResult] | None = None
_batch_skip: str | None = None
_batch_dir: Path | None = None


def register(check: GuestCheck) -> GuestCheck:
    """Add a check to the shared boot. Call at import time, before any ``batch()``."""
    if _batch_results is not None:
        raise RuntimeError(f"guest check {check.name!r} registered after the batch already ran")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", check.name):
        raise ValueError(f"guest check name {check.name!r}: use letters, digits, _ . -")
    if check.name in _registry and _registry[check.name] != check:
        raise ValueError(f"guest check {check.name!r} registered twice")
    _registry[check.name] = check
    return check


def _batch_script(checks: list[GuestCheck], folder: Path) -> str:
    """The guest script: every check at once (the guest has the host's CPUs, and the
    emulated boot's checks were most of CI's longest set-up when run in turn), each
    with its own log, status and time limit. Checks share the guest's kernel, so each
    keeps to namespaces and names of its own."""
    lines = [
        "# Generated by tests/vm/harness.py: every registered check, one boot, side by side.",
        "set -u",
        'echo "guest kernel $(uname -r) cpus $(nproc)"',
    ]
    for check in checks:
        check_dir = folder / check.name
        argv = [
            arg.replace("{out}", str(check_dir)).replace("{python}", GUEST_PYTHON)
            for arg in check.argv
        ]
        q_dir = shlex.quote(str(check_dir))
        lines += [
            "(",
            f"  echo \"== {check.name} at $(date +%s)\"",
            f"  if [ -e {q_dir}/prepare-failed ]; then",
            f"    echo 'prepare failed on the host' > {q_dir}/log; echo 1 > {q_dir}/rc",
            "  else",
            f"    timeout -k 5 {check.timeout:g} {shlex.join(argv)} > {q_dir}/log 2>&1",
            f"    echo $? > {q_dir}/rc",
            "  fi",
            f"  echo \"== {check.name} rc=$(cat {q_dir}/rc) at $(date +%s)\"",
            ") &",
        ]
    lines.append("wait")
    return "\n".join(lines) + "\n"


def batch(timeout: float = 240.0) -> dict[str, CheckResult]:
    """Run every registered check in ONE guest boot (the first call), and return the results.

    ``timeout`` bounds the whole boot; it is cut down to the boot allowance plus
    the checks' own limits when that is shorter. Later calls return the same
    results (or skip with the same reason) without booting again.
    """
    global _batch_results, _batch_skip, _batch_dir
    if _batch_skip is not None:
        pytest.skip(_batch_skip)
    if _batch_results is not None:
        return _batch_results
    checks = list(_registry.values())
    if not checks:
        raise RuntimeError("harness.batch(): no guest check registered")
    folder = Path(tempfile.mkdtemp(prefix="nfgate-vm-batch-"))
    _batch_dir = folder
    if not os.environ.get("NFGATE_VM_KEEP"):
        atexit.register(shutil.rmtree, folder, True)
    for check in checks:
        check_dir = folder / check.name
        check_dir.mkdir()
        if check.prepare is not None:
            try:
                check.prepare(check_dir)
            except Exception as err:  # reported as that check's failure, the others still run
                (check_dir / "prepare-failed").write_text(f"{type(err).__name__}: {err}\n")
    (folder / "script.sh").write_text(_batch_script(checks, folder))
    limit = min(timeout, BOOT_ALLOWANCE + sum(c.timeout + 5 for c in checks))
    try:
        vm = _boot(folder, limit)
    except VmUnavailable as err:
        _batch_skip = str(err)
        pytest.skip(_batch_skip)
    results: dict[str, CheckResult] = {}
    for check in checks:
        check_dir = folder / check.name
        rc_path, log_path = check_dir / "rc", check_dir / "log"
        rc_text = rc_path.read_text().strip() if rc_path.exists() else ""
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        failed = check_dir / "prepare-failed"
        if failed.exists():
            log = f"prepare on the host failed: {failed.read_text()}{log}"
        results[check.name] = CheckResult(
            rc=int(rc_text) if rc_text.isdigit() else -1, log=log, out=check_dir, vm=vm
        )
    _batch_results = results
    return results


def describe(result: CheckResult, tail: int = 60) -> str:
    """A failure message: the check's status and log tail, and the boot's when it did not report."""
    kept = "" if os.environ.get("NFGATE_VM_KEEP") else "; set NFGATE_VM_KEEP=1 to keep it"
    parts = [f"guest check rc={result.rc} (vm rc={result.vm.rc}, {result.vm.seconds:.1f}s"
             f"{', timed out' if result.vm.timed_out else ''}, folder {result.out}{kept})"]
    parts.append("--- check log:\n" + "\n".join(result.log.splitlines()[-tail:]))
    if result.rc < 0 or result.vm.rc != 0:
        parts.append("--- guest log:\n" + "\n".join(result.vm.log.splitlines()[-tail:]))
        parts.append("--- vng console:\n" + "\n".join(result.vm.console.splitlines()[-tail:]))
    return "\n".join(parts)
