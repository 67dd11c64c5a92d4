"""The processor's event loop: one NFQUEUE, the signalling socket, the control socket and a tick.

One thread and one ``selectors`` loop (the seed's packet processor part, one
per queue; docs/datapath.md, "Queue numbers and steering"). Everything it
does is short and non-blocking, so packets never wait behind anything but
other packets. The two exceptions, walks of the whole conntrack table
(tens of milliseconds or more inside one socket call), run on threads of
their own that do nothing else: the reap's (``kernel.Reaper``) and the dump
behind ``{"cmd": "flows"}`` (``kernel.Lister``, which hands its list back
through the loop's wake-up socket):

- the queue's netlink socket is read in batches of ``processor.queue_batch``
  messages, so a flood cannot starve signalling, expiry or the control
  socket; each packet goes through ``ProcessorCore.handle``, whose verdict
  comes with the binding elements to write first; then, for the whole
  batch, those elements go into the kernel's NAT maps in one transaction
  (``kernel.NatWriter``), the datagrams the core asked for (the NEW_FLOW
  pushes) are sent, and only then the verdicts are given, so conntrack NATs
  each first packet and the push races ahead of it;
- conntrack destroy events (``kernel.Conntrack``) end bindings; at start the
  processor adopts the bindings the kernel still carries (a restart cuts no
  established flow), and after lost events it compares with a dump;
- signalling is UDP on ``gateway_link.router_address``, port
  ``signalling.port`` + instance, bound with IP_FREEBIND so the processor can
  start before the blind track exists; sends never wait (DESIGN invariant 6):
  a datagram the kernel will not take at once is counted and dropped, and
  the gateway's pull covers it;
- dynamic rules are elements of the binding table's sets, written
  in-process by the same ``kernel.NatWriter``, one transaction each;
- the control socket (``firewall.control``: unix, mode 0600) answers
  ``stats`` and ``flows`` on the same selector, without blocking (``flows``
  once the lister's dump is in: ``control.Later``).
- with ``[ha]``, instance 0 refreshes the backup's copies of the node's UDP
  connections while the node is master (``refresh``): a pass starts at the
  tick, and its dump is read a chunk per wake-up on the same selector.

Nothing raised while handling a packet leaves the callback (netfilterqueue
would lose the verdict): it is counted as ``drop.internal`` and the packet
dropped. An error in any other handler is logged and counted, and the loop
goes on.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from netfilterqueue import NetfilterQueue, Packet
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from firewall import ha, sdnotify
from firewall.config import Config
from firewall.control import BadRequest, Command, ControlServer, Later, SelectorLoop
from firewall.errors import KernelError, PrivilegeError
from firewall.processor.core import DROP, PASS, NatOp, Outputs, ProcessorCore, Route
from firewall.processor.kernel import Connection, Conntrack, Lister, NatWriter, Reaper, queue_counters
from firewall.processor.refresh import Refresher, Schedule, interval, selection, udp_timeout
from firewall.signalling import MAX_DATAGRAM, Encoder, Guard, Role, load_or_create_key

log = logging.getLogger("nfgate.processor")

TICK = 1.0  # seconds between expiry runs; FlowTable counts whole seconds
# The kernel's queue for us: packets it holds while we are busy. The default
# (1024) is 15 ms at 69k pps; a burst of new flows (a route lookup each)
# must not overflow it, since an overflow drops. 16384 queued skbs pin at
# most about 40 MB of kernel memory with 1500-byte packets.
# Asked for whole packets, but netfilterqueue caps the copy at its 4016-byte
# buffer: a larger first packet (a reassembled UDP datagram) comes cut short,
# which is enough, since the core reads headers only (packet.parse, whole=False).
QUEUE_COPY_RANGE = 0xFFFF
SIGNALLING_BATCH = 256  # datagrams read before the loop moves on
ROUTE_CACHE_SIZE = 65536  # entries, then the cache starts over
LOCAL_ADDRESS_SECONDS = 5.0  # how long the router's address list is reused
ERROR_LOG_INTERVAL = 10.0  # seconds between tracebacks of one kind; all are counted
CONTROL_MAX_REQUEST = 4096  # bytes: a request is one small JSON object
CONTROL_MAX_CLIENTS = 16
CONTROL_TIMEOUT = 5.0  # seconds a control connection may take
FLOWS_LIMIT = 10000  # bindings listed by {"cmd": "flows"} unless it asks for another limit (stats has the total)
FLOWS_LIMIT_MAX = 1_000_000
RTN_LOCAL = 2  # rtm_type of a route to one of our own addresses
# Reaps skipped in a row while destroy events keep coming (the kernel is evicting
# already: its garbage collector runs often in a busy table). A reap walks the
# whole table (12 % of a busy processor's time at 500 RTP streams, py-spy).
REAP_MAX_SKIPS = 4
# Linux values that Python's socket module does not export.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # root may exceed net.core.[rw]mem_max
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_COUNTED_ERRORS = (errno.EAGAIN, errno.ENOBUFS)
ACCT_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_acct")


def default_control_path(queue: int) -> Path:
    return Path(f"/run/nfgate/processor-{queue}.sock")


class Routes:
    """Route lookups for the core, cached per destination for ``processor.route_cache``
    seconds: a lookup costs ~0.2 ms and routes change rarely."""

    def __init__(self, ipr: IPRoute, cache_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ipr = ipr
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[int, tuple[float, Route | None]] = {}
        self._names: dict[int, str | None] = {}
        self._local: tuple[float, list[ipaddress.IPv4Address]] = (0.0, [])
        self._local6: tuple[float, list[ipaddress.IPv6Address]] = (0.0, [])

    def __call__(self, dst: int) -> Route | None:
        now = self._clock()
        hit = self._cache.get(dst)
        if hit is not None and hit[0] > now:
            return hit[1]
        route: Route | None
        try:
            # An IPv6 flow's addresses are above 2**32 (the core drops ::/8 sources).
            where = ipaddress.IPv4Address(dst) if dst <= 0xFFFFFFFF else ipaddress.IPv6Address(dst)
            msg = self._ipr.route("get", dst=str(where))[0]
        except (NetlinkError, IndexError):
            route = None
        else:
            prefsrc = msg.get("RTA_PREFSRC")
            route = Route(
                msg["type"] == RTN_LOCAL,
                self.ifname(msg.get("RTA_OIF")),
                int(ipaddress.ip_address(prefsrc)) if prefsrc else None,
            )
        if len(self._cache) >= ROUTE_CACHE_SIZE:
            self._cache.clear()
        self._cache[dst] = (now + self.cache_seconds, route)
        return route

    def ifname(self, index: int | None) -> str | None:
        if index is None:
            return None
        try:
            return socket.if_indextoname(index)
        except OSError:
            return None

    def local_addresses(self) -> list[ipaddress.IPv4Address]:
        now = self._clock()
        if self._local[0] <= now:
            addrs = [ipaddress.IPv4Address(a.get("IFA_ADDRESS")) for a in self._ipr.get_addr(family=socket.AF_INET)]
            self._local = (now + LOCAL_ADDRESS_SECONDS, addrs)
        return self._local[1]

    def local_addresses6(self) -> list[ipaddress.IPv6Address]:
        now = self._clock()
        if self._local6[0] <= now:
            addrs = [ipaddress.IPv6Address(a.get("IFA_ADDRESS")) for a in self._ipr.get_addr(family=socket.AF_INET6)]
            self._local6 = (now + LOCAL_ADDRESS_SECONDS, addrs)
        return self._local6[1]


class _Batch:
    """The queue's netlink socket as ``NetfilterQueue.run_socket`` reads it, but
    "would block" after ``processor.queue_batch`` messages: run_socket loops until EAGAIN,
    and a queue that never empties must not keep the loop from its other work."""

    def __init__(self, sock: socket.socket, overflow: Callable[[], None]) -> None:
        self._sock = sock
        self._overflow = overflow
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        try:
            return self._sock.recv(size)
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                self._overflow()  # the kernel dropped queued packets: our buffer was full
            raise


def _limit(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= FLOWS_LIMIT_MAX:
        raise BadRequest(f"{name} must be an integer 0..{FLOWS_LIMIT_MAX}")
    return value


def _live(value: Any, name: str) -> dict[str, list[int]]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        for k, v in value.items()
    ):
        raise BadRequest(f"{name} must map gateway names to lists of worker numbers")
    return value


def _workers(r: "Runner", a: dict[str, Any]) -> dict[str, list[int]]:
    """The supervisor's word on which gateway workers are live (firewall/processor/spread.py)."""
    try:
        live = r.core.spread.set_live(a["live"])
    except ValueError as err:
        raise BadRequest(f"live: {err}") from None
    r.core.counters["control.workers"] += 1
    return live


COMMANDS: dict[str, Command[Runner]] = {
    "stats": Command(lambda r, a: r.stats(), help="counters, pool use, flows per gateway"),
    "flows": Command(lambda r, a: r.flows(a["limit"]), optional={"limit": (_limit, FLOWS_LIMIT)},
                     help="the live bindings, at most limit of them"),
    "rules": Command(lambda r, a: r.rules(a["limit"]), optional={"limit": (_limit, FLOWS_LIMIT)},
                     help="the dynamic rules (gateways' requests, adjacent ports, offloads), at most limit of them"),
    "workers": Command(_workers, args={"live": _live},
                       help="which workers of each gateway of several take new flows (the supervisor says)"),
}


class Runner:
    """One processor instance, bound to ``config.processor.queues[instance]``."""

    def __init__(self, config: Config, instance: int, *, control_path: Path | None = None, push: bool = True) -> None:
        self.config = config
        self.instance = instance
        self.queue = config.processor.queues[instance]
        self.control_path = control_path or default_control_path(self.queue)
        self.push = push
        # With [ha], the node's VRRP state file (``_check_standby``) and the (mtime, size) last read.
        self._ha_state = ha.paths(config.ha, config.node).state if config.ha is not None and config.node else None
        self._ha_seen: tuple[int, int] | None = None
        self._ha_vrrp: str | None = None  # the state last read from it
        self._ha_read = 0  # its transitions read so far
        # With [ha], the node's first processor refreshes the backup's copies of nfgate's UDP
        # connections while the node is master (``refresh``, docs/ha.md "UDP refresh").
        self.refresher: Refresher | None = None
        self._schedule = Schedule(0.0)
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self.control = ControlServer(self.control_path, COMMANDS, self, timeout=CONTROL_TIMEOUT,
                                     max_clients=CONTROL_MAX_CLIENTS, request_max=CONTROL_MAX_REQUEST)
        self._quiet_until: dict[str, float] = {}
        self.started = time.monotonic()

    # ---- set-up -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; then unbind, remove our rules, close. Returns 0."""
        if os.geteuid() != 0:
            raise PrivilegeError("processor: needs root (NFQUEUE, netlink, iptables/nft)")
        cfg = self.config
        key = load_or_create_key(cfg.signalling.key_file)  # before anything else, as keyfile asks
        # The Guard exists before the socket: nothing sent before it existed is accepted.
        guard = Guard(key, Role.PROCESSOR, now=time.time(), replay_window=cfg.signalling.replay_window)
        marks = cfg.processor.marks
        self.ct = Conntrack(marks.mask, marks.rewritten)
        # Listening before any packet can be bound: the kernel only gives a
        # connection destroy events if someone listened when it was created
        # (nf_conntrack_events = 2, the default), and a first packet queued
        # before this would make a binding that never ends.
        self.ct.open_events()
        # The queue next: a second processor started for a queue that has
        # one must fail before it touches that one's rules or bindings.
        self._bind_queue()
        self.nat = NatWriter(cfg.processor.timeouts.nat_element)
        if not self.nat.table_present():
            raise KernelError("processor: the binding table (table ip nfgate_bind) is not loaded: run `nfgate apply` first")
        self.nat.flush_instance(self.instance)  # a predecessor's dynamic rules: nobody answers for them now
        self.nat.probe_destroy()  # Linux 6.3+: an element that timed out meanwhile refuses no removal
        self.ipr = IPRoute()
        self.routes = Routes(self.ipr, self.config.processor.route_cache)
        self.core = ProcessorCore(
            cfg, self.instance, Encoder(key, Role.PROCESSOR), guard,
            route=self.routes, ifname=self.routes.ifname, local_addresses=self.routes.local_addresses,
            local_addresses6=self.routes.local_addresses6,
            conntrack=self.ct.alive, closing=self.ct.closing, now=time.monotonic(), wall=time.time(), push=self.push,
        )
        self.reaper = Reaper(marks.mask, marks.rewritten, marks.passed, self.core.counters,
                             on_error=lambda: self._internal("conntrack.reap_error", "a conntrack reap"))
        if cfg.processor.conntrack_accounting:
            self._accounting_on()
        # Before the queue is read: no new flow may be given an F:f still in use.
        adopted = self.core.adopt(self.ct.ours(), time.monotonic())
        if self.core.six is not None:
            adopted += self.core.adopt6(self.ct.ours(socket.AF_INET6), time.monotonic())
        self._handle = self.core.handle
        self._now = time.monotonic()
        self._open_refresher()
        try:
            self._open_sockets()
            log.info(
                "queue %d: signalling %s:%d, control %s, %d bindings adopted from conntrack%s",
                self.queue, cfg.gateway_link.router_address.ip, cfg.processor_signalling_port(self.instance),
                self.control_path, adopted,
                "" if self.push else ", TEST: NEW_FLOW pushes skipped",
            )
            sdnotify.notify("READY=1")  # bound, and every socket serves: nfgate run waits for this
            self._loop()
        finally:
            self._close()
        return 0

    def _open_refresher(self) -> None:
        ha_cfg = self.config.ha
        if ha_cfg is None or self._ha_state is None or self.instance != 0 or ha_cfg.udp_refresh <= 0:
            return
        marks = self.config.processor.marks
        kernel = udp_timeout()
        every = interval(ha_cfg.udp_refresh, kernel)
        if every < ha_cfg.udp_refresh:
            log.warning("queue %d: ha.udp_refresh %g s is more than a third of nf_conntrack_udp_timeout (%s s): "
                        "refreshing every %g s", self.queue, ha_cfg.udp_refresh, kernel, every)
        self._schedule = Schedule(every)
        # Each dump walks the whole table: IPv6's only if the node has IPv6 gateway flows or all are asked for.
        families = (socket.AF_INET, socket.AF_INET6) if self.core.six is not None or ha_cfg.udp_refresh_all \
            else (socket.AF_INET,)
        self.refresher = Refresher(selection(marks.rewritten, marks.allowed, ha_cfg.udp_refresh_all), self.core.counters,
                                   families)
        log.info("queue %d: while node %s is master, the copies on the peer of %s are refreshed every %g s",
                 self.queue, self.config.node, "every UDP connection" if ha_cfg.udp_refresh_all else
                 "nfgate's UDP connections", every)

    def _accounting_on(self) -> None:
        """Conntrack's per-connection counters, for ``nfgate flows`` (processor.conntrack_accounting)."""
        try:
            if ACCT_SYSCTL.read_text().strip() != "1":
                ACCT_SYSCTL.write_text("1\n")
                log.info("queue %d: turned on conntrack accounting (%s = 1, processor.conntrack_accounting)",
                         self.queue, ACCT_SYSCTL)
        except OSError as err:
            log.warning("queue %d: cannot turn on conntrack accounting (%s): nfgate flows counts nothing", self.queue, err)

    def _bind_queue(self) -> None:
        cfg = self.config
        nfq = NetfilterQueue()
        try:
            nfq.bind(self.queue, self._on_packet, max_len=cfg.processor.queue_maxlen, range=QUEUE_COPY_RANGE,
                     sock_len=cfg.processor.queue_buffer)
        except OSError as err:
            raise KernelError(f"processor: cannot bind NFQUEUE {self.queue} ({err}); is another processor bound to it?") from None
        self.nfq = nfq  # bound: from here on this instance owns the queue's rules

    def _open_sockets(self) -> None:
        cfg = self.config
        qsock = socket.socket(fileno=os.dup(self.nfq.get_fd()))
        qsock.setblocking(False)
        self._qsock = qsock
        self._batch = _Batch(qsock, self._overflowed)
        self._pending: list[tuple[Packet, int, int, tuple[NatOp, ...]]] = []
        self._sel.register(qsock, selectors.EVENT_READ, self._on_queue)
        self._sel.register(self.ct.events, selectors.EVENT_READ, self._on_conntrack)
        if self.refresher is not None:
            self._sel.register(self.refresher.sock, selectors.EVENT_READ, self._on_refresh)

        sig = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sig.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sig.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, cfg.signalling.socket_buffer)
        sig.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, cfg.signalling.socket_buffer)
        sig.setblocking(False)
        sig.bind((str(cfg.gateway_link.router_address.ip), cfg.processor_signalling_port(self.instance)))
        self.sig = sig
        self._sigbuf = bytearray(MAX_DATAGRAM)
        self._sel.register(sig, selectors.EVENT_READ, self._on_signalling)

        self.control.open()
        self.control.attach(SelectorLoop(self._sel))

        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        marks = cfg.processor.marks
        self.lister = Lister(marks.mask, marks.rewritten, wake=self._poke)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _poke(self) -> None:
        """From another thread: wake the loop (the lister has an answer)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway; closed: stopping

    def _close(self) -> None:
        self.nfq.unbind()  # with fail_mode open the kernel now bypasses us; closed drops
        nat = getattr(self, "nat", None)
        if nat is not None:
            nat.flush_instance(self.instance)
        log.info("queue %d: stopped; its dynamic rules removed", self.queue)
        signal.set_wakeup_fd(-1)
        control = getattr(self, "control", None)
        if control is not None:
            control.close()
        for name in ("_qsock", "sig", "_wake_r", "_wake_w"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close()
        self.ct.close()
        for name in ("reaper", "lister"):
            worker = getattr(self, name, None)
            if worker is not None:
                worker.close()
        if self.refresher is not None:
            self.refresher.close()
        self.ipr.close()
        self._sel.close()

    # ---- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        self._events_seen = False  # destroy events since the last reap's turn
        self._reaps_skipped = 0
        next_tick = time.monotonic() + TICK
        next_reap = next_tick
        while not self._stop:
            timeout = max(0.0, next_tick - time.monotonic())
            for key, _ in self._sel.select(timeout):
                try:
                    key.data(key.fileobj)
                except Exception:  # noqa: BLE001 - one bad event must not stop the processor
                    self._internal("internal.loop", "an event")
            try:
                self.lister.finish()  # the flows listed meanwhile, if any (woken by ``_poke``)
            except Exception:  # noqa: BLE001 - as any handler's
                self._internal("internal.loop", "a flows listing")
            now = time.monotonic()
            if now >= next_reap:
                if self._events_seen and self._reaps_skipped < REAP_MAX_SKIPS:
                    self._reaps_skipped += 1
                else:
                    self._reap()
                    self._reaps_skipped = 0
                self._events_seen = False
                next_reap = now + self.config.processor.timeouts.reap
            if now >= next_tick:
                self._check_standby()  # a takeover as soon as the node became master, event or not
                self._refresh(now)
                self.core.tick(now, time.time())
                self.control.expire(now)
                next_tick = now + TICK
            self._flush()

    def _flush(self) -> None:
        """Carry out what the core's entry points asked for since the last flush."""
        self._carry(self.core.take())

    def _carry(self, out: Outputs) -> None:
        """Kernel operations first (their completion may ask for more), then the
        elements and connections to delete, then the datagrams (replies to those
        operations included: a RULE_ACK promises the rule is in place); until the
        core asks for nothing more."""
        core = self.core
        while out:
            if out.kernel_ops:
                # In order, in-process, all of them in one transaction (one
                # sendmsg): a burst of offloads or rule requests costs one
                # commit, not one each.
                try:
                    done = self.nat.apply_all(out.kernel_ops)
                except Exception:  # noqa: BLE001 - counted; the rules are refused or retired
                    self._internal("kernel.error", "a dynamic rule")
                    done = [False] * len(out.kernel_ops)
                now = time.monotonic()
                for op, ok in zip(out.kernel_ops, done):
                    core.kernel_done(op.token, ok, now)
            if out.unbind or out.ct_deletes:
                self._unbind(out)
            self._send(out.datagrams)
            out = core.take()

    def _unbind(self, out: Outputs) -> None:
        """An offloaded flow's binding elements, then its connections: from here its
        next packet is new to conntrack, and its ALLOW takes it."""
        try:
            self.nat.delete(out.unbind)
        except Exception:  # noqa: BLE001 - the elements time out on their own
            self._internal("nat.delete_error", "binding elements")
        for key in out.ct_deletes:
            try:
                self.ct.delete(*key)
            except Exception:  # noqa: BLE001 - the connection then ends at conntrack's pace
                self._internal("conntrack.delete_error", "a conntrack delete")

    def _send(self, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        counters = self.core.counters
        sendto = self.sig.sendto
        for data, peer in datagrams:
            try:
                sendto(data, peer)
            except OSError as err:
                # Never wait for a gateway: the pull (QUERY) covers a lost push.
                reason = "buffer_full" if err.errno in _COUNTED_ERRORS else "error"
                counters[f"signalling.send_failed.{reason}"] += 1

    def _on_queue(self, sock: socket.socket) -> None:
        # One clock read per batch: a batch takes milliseconds.
        self._now = time.monotonic()
        self._batch.left = self.config.processor.queue_batch
        try:
            self.nfq.run_socket(self._batch)  # type: ignore[arg-type]  # it only calls recv()
        finally:
            self._settle()

    def _overflowed(self) -> None:
        self.core.counters["queue.overflow"] += 1

    def _on_packet(self, pkt: Packet) -> None:
        """Decide now, give the verdict in ``_settle``, after the batch's NAT elements are in."""
        try:
            verdict, ops, mark = self._handle(pkt.get_payload(), pkt.get_mark(), pkt.indev, self._now)
        except Exception:  # noqa: BLE001 - never raise out of the queue callback
            self._internal("drop.internal", "a packet")
            verdict, ops, mark = DROP, (), 0
        self._pending.append((pkt, verdict, mark, ops))

    def _settle(self) -> None:
        pending = self._pending
        if not pending:
            return
        core = self.core
        ops = [op for p in pending for op in p[3]]
        try:
            written = self.nat.write(ops)
        except Exception:  # noqa: BLE001 - a packet without its NAT is dropped, never let through
            self._internal("nat.write_error", "binding elements")
            written = [False] * len(ops)
        out = core.take()
        self._send(out.datagrams)  # the push goes out before the packet it describes
        out.datagrams = []
        if out.unbind or out.ct_deletes:
            # An offloaded flow's held leg B goes before its direct connection's first
            # packet is let through: they share a reply tuple.
            self._unbind(out)
            out.unbind, out.ct_deletes = [], []
        at = 0
        for pkt, verdict, mark, mine in pending:
            start, at = at, at + len(mine)
            try:
                if verdict == PASS and all(written[start:at]):
                    pkt.set_mark(mark)
                    pkt.accept()
                else:
                    if verdict == PASS:
                        core.counters["drop.nat_write_failed"] += 1
                    pkt.drop()
            except Exception:  # noqa: BLE001 - one packet's verdict must not lose the others'
                self._internal("verdict.error", "a verdict")
        pending.clear()
        self._carry(out)  # the rest (a flow's adjacent rule, a replaced flow's rules) after the verdicts

    def _reap(self) -> None:
        if self.core.watching:
            self.reaper.kick()  # its dump walks the whole table: on the reaper's thread

    def _check_standby(self) -> None:
        """With [ha]: whether this node is backup or in fault now, from its notify script's state
        file (written before the script flushes the table), read again only when it changed."""
        path = self._ha_state
        if path is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return  # keepalived has not decided yet: no flow can have been bound
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._ha_seen:
            return
        self._ha_seen = seen
        states = [e.get("state", "unknown") for e in ha.read_events(self.config, self.config.node or "")]
        # Every transition since the last read (the file only grows; a new file is read whole).
        new = states[self._ha_read:] if len(states) >= self._ha_read else states
        self._ha_read = len(states)
        if not new:
            return
        state, before, self._ha_vrrp = new[-1], self._ha_vrrp, new[-1]
        if ha.became_primary(before, new) and self.core.peer_pool is not None:
            self._take_over()
        standby = state in ("backup", "fault")
        if standby != self.core.standby:
            log.info("queue %d: node %s is %s: %s", self.queue, self.config.node, state,
                     "bindings it loses go on at the peer: their gateways are not told they ended" if standby
                     else "gateways are told when its bindings end")
        self.core.standby = standby

    def _refresh(self, now: float) -> None:
        """A pass of the UDP refresh when ``Schedule`` says (only while the node is master)."""
        refresher = self.refresher
        if refresher is None:
            return
        refresher.answers()  # the kernel's refusals of the last chunk's updates
        act = self._schedule.decide(now, self._ha_vrrp == "primary")
        if act is False:
            refresher.stop()
        elif act and not refresher.begin():
            self.core.counters["refresh.overrun"] += 1  # the last pass is still being read

    def _on_refresh(self, sock: socket.socket) -> None:
        assert self.refresher is not None
        self.refresher.step()

    def _take_over(self) -> None:
        """This node became master: take over the bindings conntrackd copied from the peer, and
        those this node let go of when it stepped back (``ProcessorCore.adopt``, docs/ha.md)."""
        try:
            taken = self.core.adopt(self.ct.ours(), time.monotonic(), takeover=True)
        except Exception:  # noqa: BLE001 - the flows go on in the kernel; only their signalling is lost
            self._internal("takeover.error", "a takeover")
            return
        log.info("queue %d: node %s is master: took over %d bindings from conntrack; its %d bindings pushed to "
                 "their gateways", self.queue, self.config.node, taken, len(self.core.table))
        self._flush()

    def _on_conntrack(self, sock: socket.socket) -> None:
        now = time.monotonic()
        self._check_standby()
        gone, lost = self.ct.destroyed()
        if gone:
            self._events_seen = True
        core = self.core
        for conn in gone:
            core.conntrack_destroyed(conn.proto, conn.orig, conn.reply, now, conn.counters)
        if lost:
            core.counters["conntrack.events_lost"] += 1
            core.resync(self.ct.ours(), now)
            if core.six is not None:
                core.resync6(self.ct.ours(socket.AF_INET6))

    def _internal(self, counter: str, what: str) -> None:
        """Count a bug's hit; log its traceback at most every ``ERROR_LOG_INTERVAL``
        (at 100k packets a second, a traceback per packet would be its own outage)."""
        self.core.counters[counter] += 1
        now = time.monotonic()
        if now >= self._quiet_until.get(counter, 0.0):
            self._quiet_until[counter] = now + ERROR_LOG_INTERVAL
            log.exception("queue %d: error handling %s (%s so far)", self.queue, what, self.core.counters[counter])

    def _on_signalling(self, sock: socket.socket) -> None:
        buf = self._sigbuf
        now = time.monotonic()
        for _ in range(SIGNALLING_BATCH):
            try:
                size, source = sock.recvfrom_into(buf)
            except BlockingIOError:
                return
            except OSError:
                self.core.counters["signalling.receive_error"] += 1
                return
            self.core.datagram(bytes(buf[:size]), source, now)

    def _on_wake(self, sock: socket.socket) -> None:
        try:
            while sock.recv(64):
                pass
        except BlockingIOError:
            pass

    # ---- control ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats = self.core.stats()
        stats["counters"].update(queue_counters(self.queue))
        stats["counters"].update({f"control.{name}": n for name, n in self.control.counters.items()})
        stats["counters"].update({f"nat.{name}": n for name, n in self.nat.counters.items()})
        return {
            **stats,
            "instance": self.instance,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 1),
            "sender_id": f"{self.core.encoder.sender_id:#018x}",
            "push": self.push,
            "workers": self.core.spread.live(),
        }

    def rules(self, limit: int) -> list[dict[str, Any]]:
        return self.core.rules.listing(time.monotonic(), time.time(), limit)

    def flows(self, limit: int) -> Later:
        """The live bindings with their connections' counters: a list, as the supervisor
        merges them, once the lister's dump is in (off this thread: ``Lister``)."""
        later = Later()

        def listed(connections: list[Connection] | None, error: BaseException | None) -> None:
            if connections is None:
                later.failed(error or KernelError("conntrack: no answer"))
                return
            try:
                acct = {(c.proto, *c.orig): (c.packets, c.bytes) for c in connections}
                later.done(self.core.flows(time.monotonic(), limit, acct))
            except Exception as err:  # noqa: BLE001 - reported as the command's internal error
                later.failed(err)

        self.lister.ask(socket.AF_INET, listed)
        return later
