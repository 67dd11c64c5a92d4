"""Carry out the rule book's kernel operations with the backend nfgate applied.

The processor puts exact, short-lived rules into the three chains ``nfgate
apply`` leaves empty for it (docs/datapath.md, "Dynamic rules"):
``dyn_redirect`` (mangle), ``dyn_dnat`` (nat prerouting) and ``dyn_allow``
(forward). Which tools to use
depends on how the ruleset was applied, so it is detected, not configured:
``table inet nfgate`` present means nft; ``NFGATE-DYN-REDIRECT`` in
iptables-nft means iptables; in iptables-legacy, iptables-legacy. The rules
themselves come from the rule model (``firewall.rules``), rendered by the
same code as the static ruleset, so the two cannot disagree on syntax.

- nft: ``nft -e -a -f -`` adds and echoes each rule with its handle, which
  is what ``delete rule ... handle N`` needs later.
- iptables: ``iptables[-legacy]-restore --noflush`` with ``-A`` lines, and
  the same lines with ``-D`` to delete: one table commit per table of an
  operation, so an operation's rules in one table go in together or not at
  all. A TCP ALLOW spans up to three tables, added mangle, nat, filter and
  removed the other way round: if a later commit failed, what went in
  stays alone (a queue rule the processor answers, or a DNAT that nothing
  accepts) until the instance removes its rules by tag at exit or at its
  next start.
- Every rule's comment is its tag, ``nfgate-dyn q<queue> k<serial>``, so at
  start and at exit an instance finds and removes exactly its own rules
  (a crashed predecessor's too), and reads the packet counters of its ALLOW
  rules by tag.

Why child processes that are not waited for: a tool run takes milliseconds,
and the processor must keep answering packets meanwhile (DESIGN invariant 6
says it never blocks on a gateway; it should not block on iptables either).
Operations run one at a time, in the order given, because order matters
(an expected flow's own rules must be in before the expectation's go). Output
goes to a temporary file rather than a pipe, so a long listing can never
fill a pipe and stall the child while nobody reads it. Only start-up and
shutdown run tools synchronously.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import IO, Callable

from firewall.rules import iptables as ipt
from firewall.rules import nft
from firewall.rules.build import DYN_ALLOW, DYN_DNAT, DYN_REDIRECT
from firewall.rules.model import Chain, Kind, Ruleset, iptables_chain_name
from firewall.processor.rulebook import TAG_PREFIX, KernelOp, KernelRule

log = logging.getLogger("nfgate.processor")

TOOL_TIMEOUT = 10.0  # seconds for one tool run; they answer in milliseconds
XTABLES_WAIT = 5  # seconds iptables may wait for the xtables lock held by another run
REDETECT_SECONDS = 5.0  # how often to look again for an applied ruleset while none is found

_KIND = {DYN_REDIRECT: Kind.MANGLE, DYN_DNAT: Kind.NAT, DYN_ALLOW: Kind.FILTER}
DYN_CHAINS = (DYN_REDIRECT, DYN_DNAT, DYN_ALLOW)
_NFT_HANDLE = re.compile(r'comment "([^"]+)".*# handle (\d+)\s*$')
_IPT_COUNTS = re.compile(r'--comment "?(' + re.escape(TAG_PREFIX) + r' q\d+ k\d+)"?.* -c (\d+) (\d+)')

Result = tuple[KernelOp, bool, "dict[str, int] | None"]  # (op, ok, DYN_ALLOW packets by tag)


@dataclass
class _Running:
    op: KernelOp
    argv: list[str]
    proc: subprocess.Popen[bytes]
    out: IO[bytes]
    deadline: float
    finish: Callable[[int, str], tuple[bool, dict[str, int] | None]]


@dataclass
class _Plan:
    """How to carry out one op: a tool run, or (argv None) an answer at once."""

    argv: list[str] | None
    stdin: str = ""
    finish: Callable[[int, str], tuple[bool, dict[str, int] | None]] = field(default=lambda rc, out: (rc == 0, None))


class KernelRules:
    """The dynamic rules of one processor instance (queue ``queue``) in the kernel.

    ``netns`` runs every tool inside that network namespace (``ip netns
    exec``): for tests that drive this class from outside a lab router.
    """

    def __init__(self, queue: int, *, netns: str | None = None) -> None:
        self.queue = queue
        self._netns = netns
        self.backend: str | None = None
        self._recheck = False  # an operation failed: the ruleset may have been re-applied
        self._next_detect = 0.0
        self._waiting: collections.deque[KernelOp] = collections.deque()
        self._running: _Running | None = None
        self._nft_handles: dict[str, tuple[str, int]] = {}  # tag -> (chain, handle)
        self._ipt_lines: dict[str, tuple[str, list[str]]] = {}  # tag -> (table, rule specs)
        self._mine = f"{TAG_PREFIX} q{queue} "

    # ---- tools ------------------------------------------------------------------------

    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self._netns, *argv] if self._netns else argv

    def _run(self, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        """A synchronous tool run (start-up and shutdown only)."""
        try:
            return subprocess.run(self._argv(argv), input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as err:
            return subprocess.CompletedProcess(argv, 255, "", str(err))

    def _tool(self, name: str) -> str:
        """``iptables`` or ``iptables-restore`` of the backend: iptables-nft-restore, iptables-legacy, ..."""
        variant = "legacy" if self.backend == "iptables-legacy" else "nft"
        first, _, rest = name.partition("-")
        return f"{first}-{variant}" + (f"-{rest}" if rest else "")

    def detect(self) -> str | None:
        """Which backend holds nfgate's dynamic chains, or None if none does (not applied yet)."""
        self.backend = None
        if shutil.which("nft") and self._run(["nft", "list", "chain", "inet", nft.TABLE, DYN_REDIRECT]).returncode == 0:
            self.backend = "nft"
        elif self._run(["iptables-nft", "-t", "mangle", "-S", iptables_chain_name(DYN_REDIRECT)]).returncode == 0:
            self.backend = "iptables"
        else:
            # Reading legacy tables loads their modules; if none is loaded in
            # this namespace, nfgate cannot have applied a legacy ruleset.
            names = self._run(["cat", "/proc/net/ip_tables_names"]).stdout.split()
            chain = iptables_chain_name(DYN_REDIRECT)
            if "mangle" in names and self._run(["iptables-legacy", "-t", "mangle", "-S", chain]).returncode == 0:
                self.backend = "iptables-legacy"
        return self.backend

    # ---- asynchronous operations ------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._waiting)

    def submit(self, op: KernelOp) -> None:
        self._waiting.append(op)

    def collect(self, now: float) -> list[Result]:
        """Finished operations, without waiting; starts the next one queued."""
        done: list[Result] = []
        while True:
            running = self._running
            if running is not None:
                rc = running.proc.poll()
                if rc is None and now < running.deadline:
                    return done
                if rc is None:
                    running.proc.kill()
                    running.proc.wait()
                    rc = -1
                running.out.seek(0)
                output = running.out.read().decode(errors="replace")
                running.out.close()
                self._running = None
                ok, counts = running.finish(rc, output)
                if not ok:
                    self._recheck = True
                    lines = [line for line in output.splitlines() if line.strip()]
                    log.warning("%s exited %d: %s", " ".join(running.argv), rc, " | ".join(lines[:3]) or "(no output)")
                done.append((running.op, ok, counts))
            if not self._waiting:
                return done
            op = self._waiting.popleft()
            plan = self._plan(op, now)
            if plan.argv is None:
                done.append((op, *plan.finish(0, "")))
                continue
            out = tempfile.TemporaryFile()
            try:
                proc = subprocess.Popen(self._argv(plan.argv), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
                assert proc.stdin is not None
                proc.stdin.write(plan.stdin.encode())  # a few rules: far below a pipe's buffer
                proc.stdin.close()
            except OSError as err:
                out.close()
                log.warning("%s: %s", plan.argv[0], err)
                done.append((op, False, None))
                continue
            self._running = _Running(op, plan.argv, proc, out, now + TOOL_TIMEOUT, plan.finish)

    def _plan(self, op: KernelOp, now: float) -> _Plan:
        if (self.backend is None or self._recheck) and now >= self._next_detect:
            # Rate-limited: these runs are synchronous (three tool runs at most).
            self._next_detect = now + REDETECT_SECONDS
            self._recheck = False
            self.detect()
        if op.add:
            if self.backend is None:
                return _Plan(None, finish=lambda rc, out: (False, None))
            return self._nft_add(op.rules) if self.backend == "nft" else self._ipt_change(op.rules, "-A")
        if op.poll:
            if self.backend is None:
                return _Plan(None, finish=lambda rc, out: (False, None))
            return self._nft_poll() if self.backend == "nft" else self._ipt_poll()
        # Removal: only what this instance installed; a rule that never got in is already gone.
        if self.backend == "nft":
            return self._nft_remove(op.rules)
        return self._ipt_change(op.rules, "-D")

    # ---- nft --------------------------------------------------------------------------

    def _nft_add(self, rules: tuple[KernelRule, ...]) -> _Plan:
        text = "".join(f"add rule {nft.FAMILY} {nft.TABLE} {r.chain} {nft.render_rule(r.rule)}\n" for r in rules)
        chains = {r.tag: r.chain for r in rules}

        def finish(rc: int, out: str) -> tuple[bool, dict[str, int] | None]:
            if rc != 0:
                return False, None
            for line in out.splitlines():
                m = _NFT_HANDLE.search(line)
                if m and m.group(1) in chains:
                    self._nft_handles[m.group(1)] = (chains[m.group(1)], int(m.group(2)))
            return all(tag in self._nft_handles for tag in chains), None

        return _Plan(["nft", "-e", "-a", "-f", "-"], text, finish)

    def _nft_remove(self, rules: tuple[KernelRule, ...]) -> _Plan:
        found = [self._nft_handles.pop(r.tag) for r in rules if r.tag in self._nft_handles]
        if not found:
            return _Plan(None)
        text = "".join(f"delete rule {nft.FAMILY} {nft.TABLE} {chain} handle {h}\n" for chain, h in found)
        return _Plan(["nft", "-f", "-"], text)

    def _nft_poll(self) -> _Plan:
        def finish(rc: int, out: str) -> tuple[bool, dict[str, int] | None]:
            if rc != 0:
                return False, None
            try:
                return True, _nft_counts(out)
            except (ValueError, KeyError, TypeError):
                return False, None

        return _Plan(["nft", "-j", "list", "chain", nft.FAMILY, nft.TABLE, DYN_ALLOW], finish=finish)

    # ---- iptables ---------------------------------------------------------------------

    def _ipt_change(self, rules: tuple[KernelRule, ...], verb: str) -> _Plan:
        tables: dict[str, list[str]] = {}
        # One commit per table, in rule order to add and in reverse to remove:
        # a unit's mangle rule (the SYNs to the processor) is in before, and out
        # after, the DNAT and the accept it guards.
        for r in rules if verb == "-A" else reversed(rules):
            if verb == "-A":
                table, specs = _ipt_specs(r)
                self._ipt_lines[r.tag] = (table, specs)
            elif r.tag in self._ipt_lines:
                table, specs = self._ipt_lines.pop(r.tag)
            else:
                continue
            tables.setdefault(table, []).extend(f"{verb} {spec}" for spec in specs)
        if not tables:
            return _Plan(None)
        text = "".join(f"*{t}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n" for t, lines in tables.items())
        tags = [r.tag for r in rules]

        def finish(rc: int, out: str) -> tuple[bool, dict[str, int] | None]:
            if rc != 0 and verb == "-A":
                for tag in tags:  # none of them went in: one commit per table
                    self._ipt_lines.pop(tag, None)
            return rc == 0, None

        return _Plan([self._tool("iptables-restore"), f"--wait={XTABLES_WAIT}", "--noflush"], text, finish)

    def _ipt_poll(self) -> _Plan:
        def finish(rc: int, out: str) -> tuple[bool, dict[str, int] | None]:
            if rc != 0:
                return False, None
            return True, {m.group(1): int(m.group(2)) for m in map(_IPT_COUNTS.search, out.splitlines()) if m}

        chain = iptables_chain_name(DYN_ALLOW)
        return _Plan([self._tool("iptables"), "-w", str(XTABLES_WAIT), "-t", "filter", "-v", "-S", chain], finish=finish)

    # ---- synchronous: start-up and shutdown -------------------------------------------

    def remove_all(self) -> int:
        """Remove every rule tagged for this queue, whoever installed it; how many were removed.

        At start this clears what a crashed predecessor left; at exit, ours.
        Waits for the operation in progress first, so nothing is added after.
        """
        if self._running is not None:
            try:
                self._running.proc.wait(timeout=TOOL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._running.proc.kill()
                self._running.proc.wait()
            self._running.out.close()
            self._running = None
        self._waiting.clear()
        self._nft_handles.clear()
        self._ipt_lines.clear()
        if self.detect() is None:
            return 0
        if self.backend == "nft":
            text = ""
            for chain in DYN_CHAINS:
                listing = self._run(["nft", "-j", "list", "chain", nft.FAMILY, nft.TABLE, chain])
                if listing.returncode != 0:
                    continue
                for item in json.loads(listing.stdout).get("nftables", []):
                    rule = item.get("rule")
                    if rule and str(rule.get("comment", "")).startswith(self._mine):
                        text += f"delete rule {nft.FAMILY} {nft.TABLE} {chain} handle {rule['handle']}\n"
            removed = text.count("\n")
            if text and self._run(["nft", "-f", "-"], text).returncode != 0:
                return 0
            return removed
        removed = 0
        restore = ""
        # filter, nat, mangle: the queue rule that guards a DNAT and an accept goes last.
        for chain in reversed(DYN_CHAINS):
            table = _KIND[chain].value
            name = iptables_chain_name(chain)
            listing = self._run([self._tool("iptables"), "-w", str(XTABLES_WAIT), "-t", table, "-S", name])
            mine = [line for line in listing.stdout.splitlines() if line.startswith(f"-A {name} ") and self._mine in line]
            if mine:
                restore += f"*{table}\n" + "".join("-D" + line[2:] + "\n" for line in mine) + "COMMIT\n"
                removed += len(mine)
        if restore and self._run([self._tool("iptables-restore"), f"--wait={XTABLES_WAIT}", "--noflush"], restore).returncode != 0:
            return 0
        return removed


def _ipt_specs(rule: KernelRule) -> tuple[str, list[str]]:
    """(table, rule specs without the verb) for one rule, rendered as the static ruleset is."""
    chain = Chain(rule.chain, _KIND[rule.chain], rules=[rule.rule])
    (table,) = ipt.render_tables(Ruleset(zones={}, chains=[chain]), 4)
    return table.name, [line.removeprefix("-A ") for line in table.rules]


def _nft_counts(listing: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith(TAG_PREFIX):
            continue
        counts[rule["comment"]] = sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return counts

