"""Which worker of a gateway takes a new flow: the seed's fig. 5b, several AGs for one protocol.

A ``[[gateway]]`` with ``workers = N`` runs as N processes, worker i on its
own G:(listen_port + i) and its own signalling port, so that a flow's
NEW_FLOW goes to the process that will accept it (a shared SO_REUSEPORT
listener would let the kernel pick a process the signalling never
reached). The processor picks the worker when it binds the flow's first
packet: round robin over the workers that are live, and the kernel carries
the rest of the flow to the same G:g.

Liveness comes from the supervisor, over the processor's control socket
(``{"cmd": "workers", "live": {gateway: [i, ...]}}``): it learns a
worker's readiness, and its death, from the end of a pipe the worker holds
open (``python -m gateways --ready-fd``), within milliseconds of a
``kill -9``, without polling. A worker that is not live gets no new flow;
its bindings are the kernel's and end with its sockets. When no worker of
a gateway is live (the supervisor has not spoken yet, or all are down) the
processor spreads over all of them, as one worker behaves.

Pure: no I/O; one ``pick`` per new flow is a dict look-up and a counter.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from firewall.flows import AgEndpoint


def worker_endpoints(config: Any) -> dict[str, tuple[AgEndpoint, ...]]:
    """Each gateway's workers' G:g, in worker order, each with its signalling peer."""
    link = config.gateway_link
    address = link.gateway_address.ip
    return {
        g.name: tuple(
            AgEndpoint.of(g.name, address, port, (str(address), config.gateway_signalling_port(g.name, i)))
            for i, port in enumerate(g.listen_ports)
        )
        for g in config.gateways
    }


class Spread:
    """Round robin over a gateway's live workers (module docstring)."""

    def __init__(self, workers: Mapping[str, tuple[AgEndpoint, ...]]) -> None:
        self._workers = dict(workers)
        # Only the gateways of several workers; by name (a str hashes once, an AgEndpoint every time).
        self._live: dict[str, tuple[AgEndpoint, ...]] = {n: g for n, g in self._workers.items() if len(g) > 1}
        self._next: dict[str, int] = {n: 0 for n in self._live}

    def pick(self, first: AgEndpoint) -> AgEndpoint:
        """The worker for a new flow whose selector names ``first`` (worker 0)."""
        live = self._live.get(first.name)
        if live is None:
            return first  # one worker
        name = first.name
        i = self._next[name]
        self._next[name] = i + 1
        return live[i % len(live)]

    def set_live(self, live: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
        """The supervisor's word on which workers are live; returns the live set now in force.

        Raises ValueError for a gateway that has no workers here or a worker
        index it does not have (the caller's mistake, refused whole)."""
        wanted: dict[str, tuple[AgEndpoint, ...]] = {}
        for name, indices in live.items():
            group = self._workers.get(name)
            if group is None or len(group) < 2:
                raise ValueError(f"{name!r} is not a gateway of several workers")
            chosen = sorted(set(indices))
            if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(group) for i in chosen):
                raise ValueError(f"{name!r} has workers 0..{len(group) - 1}")
            # None live: spread over all of them (module docstring).
            wanted[name] = tuple(group[i] for i in chosen) or group
        self._live.update(wanted)
        return self.live()

    def live(self) -> dict[str, list[int]]:
        return {name: [self._workers[name].index(ag) for ag in group] for name, group in self._live.items()}

    def peers(self) -> dict[tuple[str, int], str]:
        """Every worker's signalling peer -> its gateway's name."""
        return {ag.peer: name for name, group in self._workers.items() for ag in group if ag.peer is not None}
