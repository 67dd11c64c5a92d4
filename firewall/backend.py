"""Apply a ruleset to the kernel, atomically, and flush exactly what nfgate installed.

Backends:
- ``nft``: ``nft -f`` of the rendered table, which creates, deletes and
  redefines ``table inet nfgate`` in one transaction.
- ``iptables``: iptables-nft (xt compat) through ``iptables-restore --noflush``,
  one COMMIT per table, for IPv4 and IPv6; on a failure part-way, the tables
  are put back from the snapshot taken just before.
- ``iptables-legacy``: the same through the legacy tools.

``auto`` picks nft unless the ruleset queues packets and the kernel lacks
nft's ``queue`` expression (CONFIG_NFT_QUEUE off, as on our machines); then
iptables-nft, whose xt NFQUEUE target works there. The probe is ``nft -c``,
which asks the kernel without committing anything.

With gateways, the binding tables (``table ip nfgate_bind`` and ``table ip6
nfgate_bind6``, the NAT maps
through which the kernel carries gateway flows: ``firewall.rules.bind``) is
native nftables with every backend: in the same ``nft -f`` transaction as
the nft ruleset, or loaded by ``nft -f`` just before the iptables tables.

With ``policy.fast_path``, the flowtable's table (``table inet nfgate_fast``,
``firewall.rules.fast``) is loaded by ``nft -f`` after the filter, with
every backend but iptables-legacy, and only with the zone interfaces that
exist; a kernel that refuses it leaves the apply without a fast path, said
in the report.

Flush finds nfgate's objects by name (``table inet nfgate``, ``table ip
nfgate_bind``, ``table ip6 nfgate_bind6``, ``table inet nfgate_fast``, chains ``NFGATE-*`` and the jumps to them) in every backend,
so it needs no state file and also cleans up after a backend switch.
Nothing else is touched.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from firewall.errors import KernelError, UsageError
from firewall.rules import bind, fast
from firewall.rules import iptables as ipt
from firewall.rules import nft
from firewall.rules.model import Ruleset

BACKENDS = ("nft", "iptables", "iptables-legacy")
TOOL_TIMEOUT = 30.0  # seconds for one nft/iptables call; they answer in milliseconds

_NFT_QUEUE_PROBE = """table inet nfgate_probe {
\tchain probe {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tmeta l4proto udp queue num 0 bypass
\t}
}
"""


@dataclass
class Choice:
    backend: str
    reason: str


@dataclass
class Report:
    backend: str
    actions: list[str] = field(default_factory=list)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    tool = argv[0]
    if shutil.which(tool) is None:
        package = "nftables" if tool == "nft" else "iptables"
        raise KernelError(f"{tool} not found: install Debian's {package} package (scripts/setup does)")
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{' '.join(argv)} did not answer within {TOOL_TIMEOUT:.0f} s") from None


def nft_has_queue() -> bool:
    """Ask the kernel whether it knows nft's queue expression, committing nothing."""
    if shutil.which("nft") is None:
        return False
    return _run(["nft", "-c", "-f", "-"], _NFT_QUEUE_PROBE).returncode == 0


def choose(wanted: str, rs: Ruleset) -> Choice:
    if wanted not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {wanted!r} (auto, {', '.join(BACKENDS)})")
    if wanted != "auto":
        return Choice(wanted, "asked for")
    if not rs.has_queue():
        return Choice("nft", "no gateway queues in this ruleset")
    if nft_has_queue():
        return Choice("nft", "the kernel has nft's queue expression")
    return Choice(
        "iptables",
        "the kernel lacks nft's queue expression (CONFIG_NFT_QUEUE off): "
        "using iptables-nft, whose xt NFQUEUE target works",
    )


def _nft_load(text: str, dry_run: bool, report: Report, done: str) -> None:
    if dry_run:
        report.actions.append("would run: nft -f - <<EOF\n" + text + "EOF")
        return
    result = _run(["nft", "-f", "-"], text)
    if result.returncode != 0:
        raise KernelError(_nft_refusal(result.stderr))
    report.actions.append(done)


def apply(rs: Ruleset, backend: str, dry_run: bool = False, keep_bind: bool = False) -> Report:
    """Install ``rs``; ``keep_bind``: leave an existing binding table (its bindings and
    dynamic rules) as it is, as ``nfgate reload`` does under running processors."""
    report = Report(backend)
    if keep_bind and rs.bind is not None and not dry_run and bind_present():
        if _run(["nft", "list", "set", bind.FAMILY6, bind.TABLE6, bind.dyn_name("expect", 0, False, True)]).returncode != 0:
            # The IPv4 table of a version without IPv6 flows, or an IPv6 one without IPv6
            # dynamic rules: the IPv6 one (its bindings' first packets long passed) goes in anew.
            _nft_load(bind.render6(*rs.bind), dry_run, report, f"nft: added table {bind.FAMILY6} {bind.TABLE6}")
        rs = replace(rs, bind=None)
        report.actions.append(f"nft: kept tables {bind.FAMILY} {bind.TABLE} and {bind.FAMILY6} {bind.TABLE6} "
                              "(bindings and dynamic rules)")
        keep = True
    else:
        keep = False
    if backend == "nft":
        _nft_load(nft.render(replace(rs, fast=None)), dry_run, report, f"nft: replaced table inet {nft.TABLE} ({_count(rs)})")
    else:
        if rs.bind is not None:
            _nft_load(bind.render(*rs.bind), dry_run, report,
                      f"nft: replaced tables {bind.FAMILY} {bind.TABLE} and {bind.FAMILY6} {bind.TABLE6} (the gateway flows' NAT maps)")
        _apply_iptables(rs, backend, dry_run, report)
    _apply_fast(rs, backend, dry_run, report)
    if not dry_run and rs.bind is None and not keep:
        report.actions += _remove_bind()
    if not dry_run:
        # A backend switch must not leave the old rules working beside the new ones.
        for other in BACKENDS:
            if other != backend:
                report.actions += remove(other)
    return report


def _apply_fast(rs: Ruleset, backend: str, dry_run: bool, report: Report) -> None:
    """``policy.fast_path``'s table with the zone interfaces that exist now, or its removal.

    The fast path is a speed-up, never a condition of the firewall: what keeps it
    from loading is said in the report, and the apply goes on without it."""
    wanted = rs.fast
    if wanted is not None and backend == "iptables-legacy":
        report.actions.append("fast path: off: the iptables-legacy backend keeps to the legacy tables, "
                              "and a flowtable is nftables' (policy.fast_path, docs/config.md)")
        wanted = None
    if wanted is not None:
        present = tuple(d for d in wanted.devices if _interface_exists(d))
        missing = [d for d in wanted.devices if d not in present]
        if missing:
            them = "them" if len(missing) > 1 else "it"
            report.actions.append(f"fast path: {'interfaces' if len(missing) > 1 else 'interface'} {', '.join(missing)} "
                                  f"absent: flows through {them} take the forward chain until an apply or reload "
                                  f"finds {them}")
        if not present:
            report.actions.append("fast path: off: none of the zones' interfaces exists")
            wanted = None
    if wanted is None:
        if not dry_run:
            report.actions += _remove_table(fast.FAMILY, fast.TABLE)
        return
    text = fast.render(wanted, present)
    if dry_run:
        report.actions.append("would run: nft -f - <<EOF\n" + text + "EOF")
        return
    result = _run(["nft", "-f", "-"], text)
    if result.returncode != 0:
        why = _first_lines(result.stderr)
        if "No such file or directory" in result.stderr:
            why += " -- this kernel lacks nftables flowtables (CONFIG_NF_FLOW_TABLE, CONFIG_NFT_FLOW_OFFLOAD)"
        report.actions.append(f"fast path: off: the kernel refused the flowtable: {why}")
        report.actions += _remove_table(fast.FAMILY, fast.TABLE)
        return
    report.actions.append(f"nft: replaced table {fast.FAMILY} {fast.TABLE} (flowtable on {', '.join(present)})")


def _interface_exists(name: str) -> bool:
    """In this process's network namespace (the router's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _remove_table(family: str, table: str) -> list[str]:
    if shutil.which("nft") is None or _run(["nft", "list", "table", family, table]).returncode != 0:
        return []
    result = _run(["nft", "delete", "table", family, table])
    if result.returncode != 0:
        raise KernelError(f"nft refused to delete table {family} {table}: {result.stderr.strip()}")
    return [f"nft: deleted table {family} {table}"]


def installed() -> bool:
    """Whether any of nfgate's rules are in the kernel, in any backend."""
    if bind_present():
        return True
    if shutil.which("nft") is not None and _run(["nft", "list", "table", fast.FAMILY, fast.TABLE]).returncode == 0:
        return True
    if shutil.which("nft") is not None and _run(["nft", "list", "table", "inet", nft.TABLE]).returncode == 0:
        return True
    for backend in ("iptables", "iptables-legacy"):
        for version in (4, 6):
            tools = _Tools(backend, version)
            if tools.available() and any(t.chains for t in _saved(tools.save()).values()):
                return True
    return False


def flush() -> list[str]:
    actions: list[str] = []
    for backend in BACKENDS:
        actions += remove(backend)
    actions += _remove_bind()
    actions += _remove_table(fast.FAMILY, fast.TABLE)
    return actions or ["nothing of nfgate's was installed"]


def bind_present() -> bool:
    return shutil.which("nft") is not None and _run(["nft", "list", "table", bind.FAMILY, bind.TABLE]).returncode == 0


def _remove_bind() -> list[str]:
    """The binding tables belong to every backend: only flush, or a ruleset without gateways, removes them."""
    if not bind_present():
        return []
    actions = []
    for family, table in ((bind.FAMILY, bind.TABLE), (bind.FAMILY6, bind.TABLE6)):
        if _run(["nft", "list", "table", family, table]).returncode != 0:
            continue  # the IPv6 table of an older version's ruleset
        result = _run(["nft", "delete", "table", family, table])
        if result.returncode != 0:
            raise KernelError(f"nft refused to delete table {family} {table}: {result.stderr.strip()}")
        actions.append(f"nft: deleted table {family} {table}")
    return actions


def remove(backend: str) -> list[str]:
    if backend == "nft":
        if shutil.which("nft") is None:
            return []
        if _run(["nft", "list", "table", "inet", nft.TABLE]).returncode != 0:
            return []
        result = _run(["nft", "delete", "table", "inet", nft.TABLE])
        if result.returncode != 0:
            raise KernelError(f"nft refused to delete table inet {nft.TABLE}: {result.stderr.strip()}")
        return [f"nft: deleted table inet {nft.TABLE}"]
    actions = []
    for version in (4, 6):
        tools = _Tools(backend, version)
        if not tools.available():
            continue
        state = _saved(tools.save())
        text = "".join(_removal(name, t) for name, t in state.items() if t.chains)
        if text:
            tools.restore(text)
            actions.append(f"{tools.restore_tool}: removed NFGATE chains from {', '.join(n for n, t in state.items() if t.chains)}")
    return actions


def named_counters(backend: str, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """The kernel's (packets, bytes) of the ruleset's named counters (``Ruleset.counters``).

    nft keeps them as objects of nfgate's table; in iptables a named counter
    is every rule whose comment starts with its name (a zone of several
    interfaces is several rules), summed, in the IPv6 tables where they
    live. A name the kernel does not hold is left out."""
    wanted = set(names)
    if backend == "nft":
        result = _run(["nft", "-j", "list", "counters", "table", "inet", nft.TABLE])
        if result.returncode != 0:
            return {}
        out = {}
        for item in json.loads(result.stdout).get("nftables", []):
            c = item.get("counter")
            if c and c.get("name") in wanted:
                out[c["name"]] = (int(c["packets"]), int(c["bytes"]))
        return out
    if backend not in BACKENDS:
        return {}
    tools = _Tools(backend, 6)
    if not tools.available():
        return {}
    result = _run([tools.save_tool, "-c"])
    if result.returncode != 0:
        raise KernelError(f"{tools.save_tool} -c failed: {result.stderr.strip()}")
    return counted(result.stdout, wanted)


_COUNTED = re.compile(r'^\[(\d+):(\d+)\] -A NFGATE-\S+ .*--comment "?([A-Za-z0-9_]+): ', re.M)


def counted(saved: str, wanted: set[str]) -> dict[str, tuple[int, int]]:
    """Sum ``*-save -c`` lines by the counter name their comment starts with."""
    sums: dict[str, tuple[int, int]] = {}
    for m in _COUNTED.finditer(saved):
        name = m.group(3)
        if name in wanted:
            p, b = sums.get(name, (0, 0))
            sums[name] = (p + int(m.group(1)), b + int(m.group(2)))
    return sums


# ---- iptables ---------------------------------------------------------------------------


class _Tools:
    def __init__(self, backend: str, version: int):
        prefix = "iptables" if version == 4 else "ip6tables"
        variant = "legacy" if backend == "iptables-legacy" else "nft"
        self.backend = backend
        self.version = version
        self.restore_tool = f"{prefix}-{variant}-restore"
        self.save_tool = f"{prefix}-{variant}-save"

    def available(self) -> bool:
        if shutil.which(self.save_tool) is None:
            return False
        if self.backend == "iptables-legacy":
            # Reading legacy tables loads their modules; if none are loaded in
            # this namespace, nfgate cannot have installed anything there.
            names = Path("/proc/net/ip_tables_names" if self.version == 4 else "/proc/net/ip6_tables_names")
            return names.exists() and names.read_text().strip() != ""
        return True

    def save(self) -> str:
        result = _run([self.save_tool])
        if result.returncode != 0:
            raise KernelError(f"{self.save_tool} failed: {result.stderr.strip()}")
        return result.stdout

    def restore(self, text: str, test: bool = False, noflush: bool = True) -> None:
        argv = [self.restore_tool] + (["--noflush"] if noflush else []) + (["--test"] if test else [])
        result = _run(argv, text)
        if result.returncode != 0:
            raise KernelError(f"{self.restore_tool} refused the ruleset: {_first_lines(result.stderr)}")


@dataclass
class _SavedTable:
    chains: list[str] = field(default_factory=list)  # NFGATE-* chains present
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (built-in, NFGATE chain), with repeats


_JUMP = re.compile(r"^-A (\S+) -j (NFGATE-\S+)$")


def _saved(text: str) -> dict[str, _SavedTable]:
    """nfgate's chains and the plain jumps to them, per table, from *-save output."""
    tables: dict[str, _SavedTable] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], _SavedTable())
        elif current is None:
            continue
        elif line.startswith(":NFGATE-"):
            current.chains.append(line[1:].split()[0])
        else:
            m = _JUMP.match(line)
            if m and not m.group(1).startswith("NFGATE-"):
                current.jumps.append((m.group(1), m.group(2)))
    return tables


def _removal(name: str, saved: _SavedTable) -> str:
    lines = [f"*{name}"]
    lines += [f"-D {builtin} -j {chain}" for builtin, chain in saved.jumps]
    lines += [f":{c} - [0:0]" for c in saved.chains]  # flush, freeing references between them
    lines += [f"-X {c}" for c in saved.chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _apply_iptables(rs: Ruleset, backend: str, dry_run: bool, report: Report) -> None:
    plans: list[tuple[_Tools, str, str]] = []  # (tools, restore text, snapshot)
    for version in (4, 6):
        tools = _Tools(backend, version)
        if shutil.which(tools.restore_tool) is None:
            raise KernelError(f"{tools.restore_tool} not found: install Debian's iptables package")
        snapshot = tools.save()
        saved = _saved(snapshot)
        new = ipt.render_tables(rs, version)
        blocks = []
        for table in new:
            have = saved.get(table.name, _SavedTable())
            stale = [c for c in have.chains if c not in table.chains]
            present = set(have.jumps)
            # A jump we would keep but that appears twice (someone re-ran a
            # restore by hand) is cut back to one.
            extra = [j for j in have.jumps if j in table.jumps]
            extra = [j for i, j in enumerate(extra) if j in extra[:i]]
            stale_jumps = [j for j in have.jumps if j[1] in stale] + extra
            blocks.append(table.text(present_jumps=present, delete=stale, drop_jumps=stale_jumps))
        for name, have in saved.items():
            if have.chains and name not in {t.name for t in new}:
                blocks.append(_removal(name, have))
        plans.append((tools, "".join(blocks), snapshot))

    if dry_run:
        for tools, text, _ in plans:
            report.actions.append(f"would run: {tools.restore_tool} --noflush <<EOF\n{text}EOF")
        return
    for tools, text, _ in plans:
        if text:
            tools.restore(text, test=True)
    applied: list[tuple[_Tools, str]] = []
    for tools, text, snapshot in plans:
        if not text:
            continue
        try:
            tools.restore(text)
        except KernelError:
            # iptables-restore commits table by table: put back every table
            # this apply may have changed, then raise the kernel's refusal.
            for done, snap in reversed(applied + [(tools, snapshot)]):
                _restore_snapshot(done, snap)
            raise
        applied.append((tools, snapshot))
        report.actions.append(f"{tools.restore_tool}: installed NFGATE chains ({_count(rs)})")


def _restore_snapshot(tools: _Tools, snapshot: str) -> None:
    """Best effort: the original error is the one the operator needs to see."""
    try:
        before = set(re.findall(r"^\*(\S+)", snapshot, re.M))
        tools.restore(snapshot, noflush=False)
        for name, have in _saved(tools.save()).items():
            if name not in before and have.chains:
                tools.restore(_removal(name, have))
    except KernelError:
        pass


# ---- helpers -----------------------------------------------------------------------------


def _count(rs: Ruleset) -> str:
    rules = sum(len(c.rules) for c in rs.chains)
    return f"{rules} rules in {len(rs.chains)} chains"


def _first_lines(text: str, n: int = 4) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:n]) or "(no message)"


def _nft_refusal(stderr: str) -> str:
    msg = f"the kernel refused the nft ruleset, nothing was changed: {_first_lines(stderr)}"
    if "queue" in stderr and "No such file or directory" in stderr:
        msg += (
            " -- this kernel lacks nft's queue expression (CONFIG_NFT_QUEUE);"
            " use --backend iptables or --backend auto"
        )
    return msg
