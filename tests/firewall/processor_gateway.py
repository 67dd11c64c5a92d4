"""A minimal stand-in for the gateways' deNAT/reNAT layer and a TCP relay, for the processor's netns tests.

Run inside the gateway namespace:

    processor_gateway.py --key FILE --gateway 172.31.255.2 --processor 172.31.255.1 \\
        --listen 20000 --signalling-port 7500 --listen 20021 --signalling-port 7501 \\
        [--processor-port 7500] [--query-timeout 0.5]

It stands in for one gateway process per ``--listen`` port, each with its
signalling port (7500 + the gateway's index, docs/datapath.md "Signalling
ports"), and does what docs/signalling.md asks of the gateway layer in the
simplest way (threads, blocking sockets): it takes NEW_FLOW pushes; on each accepted
connection F:f -> G:g it looks the flow up, waits ``query_timeout`` for a
push, then QUERYs the processor (``MAX_QUERY_ATTEMPTS`` times); it opens leg
B by connecting to F:f (the seed's "swap") and pumps bytes both ways.

It reports on stdout, one JSON object per line (``{"event": ...}``), and
takes commands on stdin, one JSON object per line:

- ``{"cmd": "rule", "request_id", "flow_id", "src": "A:p", "dst": "B:q", "mode": "redirect"|"allow", "ttl"}``
- ``{"cmd": "forge"}``: a QUERY under a wrong key; ``{"cmd": "replay"}``: one QUERY, then its bytes again;
  ``{"cmd": "stale"}``: a QUERY stamped a minute ago. The processor must answer only the honest one.

The real layer is ``gateways/`` (another issue); the lead switches the tests
to it when it lands.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import socket
import sys
import threading
import time
from typing import Any

from firewall.signalling import (
    MAX_DATAGRAM,
    MAX_QUERY_ATTEMPTS,
    Answer,
    Encoder,
    Endpoint,
    FlowEnd,
    FlowInfo,
    Guard,
    NewFlow,
    NotFound,
    Proto,
    Query,
    Received,
    Role,
    RuleAck,
    RuleEnd,
    RuleMode,
    RuleRefused,
    RuleRequest,
    load_key,
)

CONNECT_TIMEOUT = 5.0
PUMP_IDLE = 30.0  # seconds without data before a relayed connection is given up
_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _lock:
        print(json.dumps({"event": event, **fields}), flush=True)


def flow_fields(flow: FlowInfo) -> dict[str, Any]:
    return {
        "flow_id": flow.flow_id, "gateway": flow.gateway, "client": str(flow.client),
        "original_dst": str(flow.original_dst), "server": str(flow.server),
        "firewall_side": str(flow.firewall_side), "ag": str(flow.ag),
        "snat": str(flow.snat) if flow.snat is not None else None,
    }


class Layer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = load_key(args.key)
        self.guard = Guard(self.key, Role.GATEWAY, now=time.time())
        self.encoder = Encoder(self.key, Role.GATEWAY)
        self.socks = []
        for port in args.signalling_port:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((args.gateway, port))
            self.socks.append(sock)
        self.processor = (args.processor, args.processor_port)
        self.flows: dict[tuple[str, int, int], FlowInfo] = {}  # (F, f, g) -> flow
        self.answers: dict[int, FlowInfo | None] = {}
        self.changed = threading.Condition()
        self.next_query = 1
        self.send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.socks[0].sendto(data, self.processor)

    def receive(self, sock: socket.socket) -> None:
        while True:
            data, _ = sock.recvfrom(MAX_DATAGRAM)
            with self.changed:  # one Guard for all sockets: the processor's sequence is one
                got = self.guard.check(data, time.time())
            if not isinstance(got, Received):
                if got.name != "DUPLICATE":
                    emit("refused", reason=got.name)
                continue
            msg = got.message
            with self.changed:
                if isinstance(msg, NewFlow):
                    f = msg.flow
                    self.flows[(str(f.firewall_side.address), f.firewall_side.port, f.ag.port)] = f
                elif isinstance(msg, Answer):
                    self.answers[msg.query_id] = msg.flow
                elif isinstance(msg, NotFound):
                    self.answers[msg.query_id] = None
                self.changed.notify_all()
            if isinstance(msg, FlowEnd):
                emit("flow_end", flow_id=msg.flow_id, reason=msg.reason.name)
            elif isinstance(msg, RuleAck):
                emit("rule_ack", request_id=msg.request_id, rule_id=msg.rule_id, expires_ms=msg.expires_ms)
            elif isinstance(msg, RuleRefused):
                emit("rule_refused", request_id=msg.request_id, reason=msg.reason.name)
            elif isinstance(msg, RuleEnd):
                emit("rule_end", rule_id=msg.rule_id, reason=msg.reason.name)
            elif isinstance(msg, (Answer, NotFound)):
                emit("answer" if isinstance(msg, Answer) else "not_found", query_id=msg.query_id)

    def query(self, fw: Endpoint, ag: Endpoint) -> Query:
        q = Query(self.next_query, Proto.TCP, fw, ag)
        self.next_query += 1
        return q

    def place(self, fw: tuple[str, int], g: int) -> tuple[FlowInfo | None, str]:
        """The flow of an accepted connection: by push, else by query (docs/signalling.md, "Pull")."""
        key = (fw[0], fw[1], g)
        deadline = time.monotonic() + self.args.query_timeout
        with self.changed:
            while key not in self.flows and (left := deadline - time.monotonic()) > 0:
                self.changed.wait(left)
            if key in self.flows:
                return self.flows.pop(key), "push"
            q = self.query(Endpoint(ipaddress.IPv4Address(fw[0]), fw[1]), Endpoint(ipaddress.IPv4Address(self.args.gateway), g))
        for _ in range(MAX_QUERY_ATTEMPTS):
            self.send(self.encoder.encode(q, time.time()))  # same query id, new sequence number
            deadline = time.monotonic() + self.args.query_timeout
            with self.changed:
                while q.query_id not in self.answers and (left := deadline - time.monotonic()) > 0:
                    self.changed.wait(left)
                if q.query_id in self.answers:
                    flow = self.answers.pop(q.query_id)
                    return flow, "query"
        return None, "none"

    def relay(self, conn: socket.socket, peer: tuple[str, int], g: int) -> None:
        flow, via = self.place(peer, g)
        if flow is None:
            emit("unplaced", firewall_side=f"{peer[0]}:{peer[1]}")
            conn.close()
            return
        emit("flow", via=via, **flow_fields(flow))
        try:
            # Leg B: to F:f, which the processor restores to the server.
            up = socket.create_connection((str(flow.firewall_side.address), flow.firewall_side.port), timeout=CONNECT_TIMEOUT)
        except OSError as err:
            emit("leg_b_failed", flow_id=flow.flow_id, error=str(err))
            conn.close()
            return
        pump(conn, up)

    def listener(self, port: int) -> socket.socket:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.args.gateway, port))
        srv.listen(256)
        return srv

    def serve(self, srv: socket.socket, port: int) -> None:
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=self.relay, args=(conn, peer, port), daemon=True).start()

    def command(self, cmd: dict[str, Any]) -> None:
        now = time.time()
        fw = Endpoint(ipaddress.IPv4Address("172.31.254.1"), 1024)
        ag = Endpoint(ipaddress.IPv4Address(self.args.gateway), self.args.listen[0])
        if cmd["cmd"] == "rule":
            (sa, sp), (da, dp) = (c.rsplit(":", 1) for c in (cmd["src"], cmd["dst"]))
            req = RuleRequest(
                cmd["request_id"], cmd["flow_id"], Proto.TCP,
                Endpoint(ipaddress.IPv4Address(sa), int(sp)), Endpoint(ipaddress.IPv4Address(da), int(dp)),
                cmd.get("ttl", 30), RuleMode[cmd.get("mode", "redirect").upper()], cmd.get("one_shot", True),
            )
            self.send(self.encoder.encode(req, now))
        elif cmd["cmd"] == "forge":
            self.send(Encoder(bytes(32), Role.GATEWAY).encode(self.query(fw, ag), now))
        elif cmd["cmd"] == "replay":
            data = self.encoder.encode(self.query(fw, ag), now)
            self.send(data)
            self.send(data)
        elif cmd["cmd"] == "stale":
            self.send(self.encoder.encode(self.query(fw, ag), now - 60))
        emit("done", cmd=cmd["cmd"])


def pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways; pass each side's EOF on as a FIN; close when both are done."""
    open_ = {a: b, b: a}
    try:
        while open_:
            ready, _, _ = select.select(list(open_), [], [], PUMP_IDLE)
            if not ready:
                break
            for src in ready:
                data = src.recv(65536)
                if data:
                    open_[src].sendall(data)
                else:
                    open_[src].shutdown(socket.SHUT_WR)
                    del open_[src]
    except OSError:
        pass
    finally:
        a.close()
        b.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--processor", required=True)
    parser.add_argument("--listen", type=int, action="append", required=True)
    parser.add_argument("--signalling-port", type=int, action="append", required=True)
    parser.add_argument("--processor-port", type=int, default=7500)
    parser.add_argument("--query-timeout", type=float, default=0.5)
    layer = Layer(parser.parse_args())
    for sock in layer.socks:
        threading.Thread(target=layer.receive, args=(sock,), daemon=True).start()
    for port in layer.args.listen:
        srv = layer.listener(port)  # bound before "ready"
        threading.Thread(target=layer.serve, args=(srv, port), daemon=True).start()
    emit("ready")
    for line in sys.stdin:
        if line.strip():
            layer.command(json.loads(line))


if __name__ == "__main__":
    main()
