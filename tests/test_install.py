"""What an operator installs: the systemd units as scripts/install-units writes them,
scripts/setup's package lists and the test peers' services, and the wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = ("nfgate.service", "nfgate-tunnel-mediator.service")
MAX_EXPOSURE = 4.0
# The real peers the tests run against: none of them belongs on a router.
TEST_PEERS = {"vsftpd", "qemu-system-x86", "postfix", "proxsmtp", "ftp-proxy", "swaks", "ffmpeg", "iperf3", "lftp",
              "curl", "socat", "tcpdump", "openssh-server", "libnet-ssleay-perl", "iputils-ping"}

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="no systemd-analyze here")


def arrays(script: Path) -> dict[str, list[str]]:
    """The bash arrays ``name=( ... )`` a script declares at the start of a line, by name."""
    text = script.read_text()
    return {m.group(1): re.sub(r"#[^\n]*", "", m.group(2)).split()
            for m in re.finditer(r"^(\w+)=\(([^)]*)\)", text, re.M)}


def installed_units(dest: Path) -> list[Path]:
    """The units as `scripts/setup --system` installs them, for the checkout whose venv runs these tests."""
    prefix = Path(sys.prefix).parent
    assert (prefix / ".venv" / "bin" / "nfgate").exists(), f"no nfgate console script in {prefix}/.venv"
    subprocess.run([REPO / "scripts" / "install-units", "--dest", dest, "--prefix", prefix], check=True,
                   capture_output=True, text=True)
    return [dest / unit for unit in UNITS]


@needs_analyze
def test_units_verify_as_installed(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # The shipped files, with /opt/nfgate unpopulated here, do not: the check can fail.
    if not Path("/opt/nfgate/.venv/bin/nfgate").exists():
        shipped = subprocess.run([analyze, "verify", REPO / "scripts" / UNITS[0]], capture_output=True, text=True, timeout=60)
        assert "is not executable" in shipped.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_units_score_at_most_four(unit: str) -> None:
    result = subprocess.run([analyze, "security", "--offline=true", REPO / "scripts" / unit],
                            capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level.group(1)) <= MAX_EXPOSURE, result.stdout


def test_nfgate_unit_keeps_what_run_needs() -> None:
    text = (REPO / "scripts" / "nfgate.service").read_text()
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M).group(1).split()
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"} <= set(caps)
    for line in ("Type=notify", "RestartPreventExitStatus=2", "RuntimeDirectory=nfgate", "StateDirectory=nfgate",
                 "LimitNOFILE=1048576"):
        assert re.search(rf"^{line}$", text, re.M), line
    assert re.search(r"^Conflicts=.*\bnftables\.service\b.*\bfirewalld\.service\b", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M) and re.search(r"^Documentation=", text, re.M)
    # ip netns add/exec: mounts, and network and mount namespaces.
    assert "@mount" in text and re.search(r"^RestrictNamespaces=net mnt$", text, re.M)


def test_install_refuses_a_checkout_the_unit_hides(tmp_path: Path) -> None:
    result = subprocess.run([REPO / "scripts" / "install-units", "--dest", tmp_path, "--prefix", "/home/someone/nfgate"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "ProtectHome" in result.stderr
    assert not list(tmp_path.iterdir())


def test_setup_without_test_installs_no_test_peer() -> None:
    lists = arrays(REPO / "scripts" / "setup")
    router = set(lists["router_packages"]) | set(lists["build_packages"])
    assert router and not router & TEST_PEERS, router & TEST_PEERS
    assert TEST_PEERS <= set(lists["test_packages"]), TEST_PEERS - set(lists["test_packages"])
    # The script adds test_packages under --test only.
    text = (REPO / "scripts" / "setup").read_text()
    assert re.search(r'if \[\[ \$test == yes \]\]; then\n\s+packages\+=\("\$\{test_packages\[@\]\}"\)', text)
    assert 'scripts/setup --test' in (REPO / "scripts" / "test").read_text()


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="no systemctl here")
def test_no_test_peer_service_is_enabled() -> None:
    services = arrays(REPO / "scripts" / "setup")["test_services"]
    assert {"vsftpd", "postfix", "ftp-proxy", "proxsmtp"} <= set(services)
    enabled = []
    for name in services:
        state = subprocess.run(["systemctl", "is-enabled", name], capture_output=True, text=True).stdout.strip()
        if state == "enabled":
            enabled.append(name)
    assert not enabled, f"test peers enabled at boot: {enabled} (scripts/setup --test disables them)"


@pytest.mark.slow
def test_pip_install_gives_a_working_nfgate(tmp_path: Path) -> None:
    """`pip install .` into a fresh venv: `nfgate lab list` works, and the wheel holds the topologies and LICENSE."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True)
    pip = [venv / "bin" / "python", "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp_path / "dist", src], check=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("nfgate-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("/licenses/LICENSE") for n in names), names
    assert {"basic.json", "nat-tunnel.json"} <= {Path(n).name for n in names if "/share/nfgate/topologies/" in n}
    subprocess.run([*pip, "install", wheel], check=True, timeout=900)
    listed = subprocess.run([venv / "bin" / "nfgate", "lab", "list"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {"basic", "nat-tunnel"} <= set(re.findall(r"^\s*(\S+)", listed.stdout, re.M)), listed.stdout
