"""Lab topologies as data: load, validate and describe them.

One topology file drives the netns lab (``firewall.lab.netns``), the pytest
fixtures and the Vagrant VMs (``firewall.lab.vagrant``, which the Vagrantfile
runs with the host's python3). The files are JSON, which any tool reads.

Schema (``vagrant/topologies/<name>.json``; the ``#`` notes are not part of it,
JSON has no comments)::

    {
      "name": "basic",                  # optional; defaults to the file's stem
      "description": "one line",        # optional
      "router": "router",               # the host that plays nfgate's router
      "config": "examples/lab/basic.toml",  # optional: the nfgate config the
                                        # router applies under Vagrant (a path
                                        # inside the repository)
      "hosts": {                        # host name -> options (an empty {} is fine)
        "router": {
          "forwarding": true,           # net.ipv4.ip_forward and
                                        # net.ipv6.conf.all.forwarding; default false
          "sysctls": {"net.netfilter.nf_conntrack_udp_timeout": 5}
        },
        "swlan": {"bridge": true}       # a switch: a bridge br0 joins all its
                                        # interfaces, which hold no address
      },
      "links": [                        # one veth pair each
        {"a": {"host": "ext", "ifname": "eth0", "addresses": ["203.0.113.10/24"]},
         "b": {"host": "router", "ifname": "wan0", "addresses": ["203.0.113.1/24"]}}
      ],
      "routes": [                       # "to" is "default" or a network
        {"host": "lan", "to": "default", "via": "192.168.1.1"},
        {"host": "lan", "to": "10.9.0.0/16", "dev": "eth0"}
      ],
      "commands": {                     # run in order, after links and routes
        "router": [["nft", "add table ip t"], "nft list ruleset"]
      }
    }

Rules the loader enforces, each reported with its key path
(``links[1].b.host: unknown host 'rtr'``), all problems at once:

- Host names are 1-15 lowercase letters and digits, starting with a letter.
  They become the last part of a namespace name (``<prefix>-<host>``), so they
  hold no ``-``: that keeps the prefix recoverable from a namespace name.
- Interface names are 1-15 characters (IFNAMSIZ is 16 with the NUL) from
  ``[A-Za-z0-9_-]``, unique per host, and never ``lo``. No ``.``, because a
  sysctl key uses ``.`` as its separator.
- Addresses are interfaces with an explicit prefix length
  (``192.168.1.10/24``), IPv4 or IPv6, and no address is used twice.
- Sysctl keys must start with ``net.``: only those are per network namespace.
  Any other key would change the machine itself.
- A route's ``via`` must lie on one of the host's own networks, and its
  ``dev`` must be one of the host's interfaces.
- A command is either a list of strings (argv) or a string split like a
  shell would (``shlex``); it never runs through a shell.
- A bridge host (``"bridge": true``) is a switch for a shared segment: its
  interfaces hold no address, it has no routes and does not forward (the
  bridge does, at layer 2). ``nfgate lab up`` and the Vagrant provisioning
  make a bridge ``br0`` of all its interfaces, after the links and before the
  topology's commands. It is how two routers share the client's, the
  server's and the gateways' segments (the ``ha`` topology).
- ``config`` is a relative path inside the repository, without ``..``, to a
  file that exists: the Vagrant router VM reads it from the synced folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from pathlib import Path
from typing import Any, Union

from firewall.errors import UsageError

Address = Union[IPv4Address, IPv6Address]
Interface = Union[IPv4Interface, IPv6Interface]
Network = Union[IPv4Network, IPv6Network]

IFNAME_MAX = 15
HOST_RE = re.compile(r"^[a-z][a-z0-9]{0,14}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,15}$")
TOPOLOGY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SYSCTL_RE = re.compile(r"^net(\.[A-Za-z0-9_-]+)+$")

_TOP_KEYS = {"name", "description", "router", "config", "hosts", "links", "routes", "commands"}
_HOST_KEYS = {"forwarding", "sysctls", "bridge"}
BRIDGE = "br0"
_ENDPOINT_KEYS = {"host", "ifname", "addresses"}
_ROUTE_KEYS = {"host", "to", "via", "dev"}

# The repository holds this file at firewall/lab/topology.py.
REPO = Path(__file__).resolve().parents[2]
ENV_DIR = "NFGATE_TOPOLOGIES"


class TopologyError(UsageError):
    """A topology file is unreadable or invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


@dataclass(frozen=True)
class Endpoint:
    """One end of a veth pair: which host holds it, its name and addresses."""

    host: str
    ifname: str
    addresses: tuple[Interface, ...] = ()


@dataclass(frozen=True)
class Link:
    """A veth pair between two hosts."""

    a: Endpoint
    b: Endpoint

    @property
    def endpoints(self) -> tuple[Endpoint, Endpoint]:
        return (self.a, self.b)


@dataclass(frozen=True)
class Route:
    """A static route in one host; ``to`` is 0.0.0.0/0 or ::/0 for "default"."""

    host: str
    to: Network
    via: Address | None = None
    dev: str | None = None

    @property
    def is_default(self) -> bool:
        return self.to.prefixlen == 0


@dataclass(frozen=True)
class Host:
    """A host (a network namespace in the lab, a VM under Vagrant)."""

    name: str
    forwarding: bool = False
    sysctls: tuple[tuple[str, str], ...] = ()
    # A switch: BRIDGE joins all its interfaces (which have no addresses).
    bridge: bool = False
    commands: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Topology:
    """A whole lab: hosts, the links between them, routes and set-up commands."""

    name: str
    description: str
    router: str
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    routes: tuple[Route, ...] = ()
    source: Path | None = None
    # The nfgate config the router applies in the Vagrant lab, relative to the repository.
    config: str | None = None

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hosts)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise UsageError(f"topology {self.name}: no host {name!r} (hosts: {', '.join(self.host_names)})")

    def endpoints(self, host: str) -> tuple[Endpoint, ...]:
        """The interfaces of one host, in link order."""
        return tuple(ep for link in self.links for ep in link.endpoints if ep.host == host)

    def routes_of(self, host: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.host == host)

    def address(self, host: str, ifname: str | None = None, version: int = 4) -> Interface:
        """The first address of that IP version on a host (or on one of its interfaces).

        Tests use it to avoid repeating the topology's numbers:
        ``lab.topology.address("router", "wan0").ip``.
        """
        for ep in self.endpoints(host):
            if ifname is not None and ep.ifname != ifname:
                continue
            for addr in ep.addresses:
                if addr.version == version:
                    return addr
        where = f"{host}:{ifname}" if ifname else host
        raise UsageError(f"topology {self.name}: {where} has no IPv{version} address")


def topologies_dir() -> Path:
    """Where bare topology names are looked up: $NFGATE_TOPOLOGIES or vagrant/topologies."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else REPO / "vagrant" / "topologies"


def list_topologies() -> list[str]:
    """The names of the topologies shipped in (or pointed to by) ``topologies_dir()``."""
    d = topologies_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A bare name means ``<topologies_dir>/<name>.json``; anything with a / or .json is a path."""
    text = os.fspath(name_or_path)
    if "/" in text or text.endswith(".json"):
        return Path(text)
    if not TOPOLOGY_NAME_RE.match(text):
        raise UsageError(f"topology name {text!r}: use lowercase letters, digits, - and _")
    path = topologies_dir() / f"{text}.json"
    if not path.is_file():
        known = ", ".join(list_topologies()) or "none"
        raise UsageError(f"unknown topology {text!r} in {topologies_dir()} (known: {known})")
    return path


def load_topology(name_or_path: str | os.PathLike[str]) -> Topology:
    """Read and validate a topology by name (``basic``) or path (``./my.json``)."""
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{path}: cannot read topology: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TopologyError([f"line {err.lineno} column {err.colno}: invalid JSON: {err.msg}"], str(path)) from None
    return parse_topology(data, default_name=path.stem, source=path)


def parse_topology(data: Any, default_name: str = "topology", source: Path | None = None) -> Topology:
    """Validate decoded JSON and build a Topology, or raise TopologyError with every problem."""
    return _Parser(source).parse(data, default_name)


class _Parser:
    """Walks the decoded JSON once, collecting problems instead of stopping at the first."""

    def __init__(self, source: Path | None) -> None:
        self.source = str(source) if source else "topology"
        self.path = source
        self.problems: list[str] = []
        self.seen_endpoints: list[Endpoint] = []
        # When a whole section is broken, what refers to it is not judged, so
        # that one mistake does not come back as a dozen.
        self.hosts_ok = True
        self.links_ok = True
        self.bridge_hosts: set[str] = set()

    def err(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}" if where else msg)

    def obj(self, value: Any, where: str, keys: set[str], required: tuple[str, ...] = ()) -> dict | None:
        if not isinstance(value, dict):
            self.err(where, f"expected an object, got {type(value).__name__}")
            return None
        for key in value:
            if key not in keys:
                self.err(_join(where, key), f"unknown key (known: {', '.join(sorted(keys))})")
        for key in required:
            if key not in value:
                self.err(_join(where, key), "missing")
        return value

    def known_host(self, host: str, known: set[str], where: str) -> bool:
        if host in known:
            return True
        if self.hosts_ok:
            self.err(where, f"unknown host {host!r}")
        return False

    def string(self, value: Any, where: str) -> str | None:
        if not isinstance(value, str):
            self.err(where, f"expected a string, got {type(value).__name__}")
            return None
        return value

    def parse(self, data: Any, default_name: str) -> Topology:
        top = self.obj(data, "", _TOP_KEYS, required=("router", "hosts", "links"))
        if top is None:
            raise TopologyError(self.problems, self.source)

        name = default_name
        if "name" in top:
            name = self.string(top["name"], "name") or default_name
            if not TOPOLOGY_NAME_RE.match(name):
                self.err("name", f"{name!r}: use 1-32 lowercase letters, digits, - and _")
        description = ""
        if "description" in top:
            description = self.string(top["description"], "description") or ""
        config = self.config(top["config"]) if "config" in top else None

        host_opts = self.hosts(top.get("hosts", {}))
        known = set(host_opts)
        router = self.string(top.get("router"), "router") if "router" in top else None
        if router is not None:
            self.known_host(router, known, "router")

        links = self.links(top.get("links", []), known)
        # Routes are checked against every endpoint that names a known host,
        # even one whose link is broken, so one mistake is reported once.
        ifnames: dict[str, set[str]] = {h: set() for h in known}
        networks: dict[str, list[Interface]] = {h: [] for h in known}
        for ep in self.seen_endpoints:
            ifnames[ep.host].add(ep.ifname)
            networks[ep.host].extend(ep.addresses)
        routes = self.routes(top.get("routes", []), known, ifnames, networks)
        commands = self.commands(top.get("commands", {}), known)
        self.bridges(host_opts, routes)

        if self.problems:
            raise TopologyError(self.problems, self.source)
        hosts = tuple(
            Host(name=h, forwarding=fwd, sysctls=sysctls, bridge=h in self.bridge_hosts, commands=commands.get(h, ()))
            for h, (fwd, sysctls) in host_opts.items()
        )
        return Topology(
            name=name,
            description=description,
            router=router or "",
            hosts=hosts,
            links=tuple(links),
            routes=tuple(routes),
            source=self.path,
            config=config,
        )

    def config(self, value: Any) -> str | None:
        text = self.string(value, "config")
        if text is None:
            return None
        path = Path(text)
        if path.is_absolute() or ".." in path.parts or not text:
            self.err("config", f"{text!r}: use a relative path inside the repository, like examples/lab/basic.toml")
            return None
        # Only a checkout holds the configs (the Vagrant lab runs from one); an
        # installed nfgate ships the topologies alone, and its labs never read the key.
        if (REPO / "pyproject.toml").is_file() and not (REPO / path).is_file():
            self.err("config", f"{text!r}: no such file in {REPO}")
            return None
        return path.as_posix()

    def hosts(self, value: Any) -> dict[str, tuple[bool, tuple[tuple[str, str], ...]]]:
        out: dict[str, tuple[bool, tuple[tuple[str, str], ...]]] = {}
        if not isinstance(value, dict):
            self.err("hosts", f"expected an object of host name -> options, got {type(value).__name__}")
            self.hosts_ok = False
            return out
        if not value:
            self.err("hosts", "no hosts")
            self.hosts_ok = False
        for name, opts in value.items():
            where = f"hosts.{name}"
            if not HOST_RE.match(name):
                self.err(where, "host names are 1-15 lowercase letters and digits, starting with a letter")
            opts = self.obj(opts, where, _HOST_KEYS)
            if opts is None:
                # Still a known host, so that links naming it do not each fail too.
                out[name] = (False, ())
                continue
            forwarding = opts.get("forwarding", False)
            if not isinstance(forwarding, bool):
                self.err(f"{where}.forwarding", "expected true or false")
                forwarding = False
            bridge = opts.get("bridge", False)
            if not isinstance(bridge, bool):
                self.err(f"{where}.bridge", "expected true or false")
            elif bridge:
                self.bridge_hosts.add(name)
                if forwarding:
                    self.err(f"{where}.forwarding", "a bridge host switches at layer 2: it does not forward")
            out[name] = (forwarding, self.sysctls(opts.get("sysctls", {}), f"{where}.sysctls"))
        return out

    def bridges(self, host_opts: dict, routes: list[Route]) -> None:
        """A bridge host's interfaces hold no address and it has no routes: it is a switch."""
        for ep in self.seen_endpoints:
            if ep.host in self.bridge_hosts and ep.addresses:
                self.err(f"hosts.{ep.host}.bridge", f"{ep.ifname} has addresses: a bridge host's interfaces have none")
        for route in routes:
            if route.host in self.bridge_hosts:
                self.err(f"hosts.{route.host}.bridge", "a bridge host has no routes")

    def sysctls(self, value: Any, where: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            self.err(where, f"expected an object of sysctl key -> value, got {type(value).__name__}")
            return ()
        out = []
        for key, val in value.items():
            kw = f"{where}.{key}"
            if not SYSCTL_RE.match(key):
                # Only net.* is per network namespace; anything else would reach the host.
                self.err(kw, "only net.* sysctls are allowed (they are per network namespace)")
                continue
            if isinstance(val, bool):
                val = int(val)
            if not isinstance(val, (int, str)):
                self.err(kw, f"expected a number or a string, got {type(val).__name__}")
                continue
            out.append((key, str(val)))
        return tuple(out)

    def links(self, value: Any, known: set[str]) -> list[Link]:
        out: list[Link] = []
        if not isinstance(value, list):
            self.err("links", f"expected a list, got {type(value).__name__}")
            self.links_ok = False
            return out
        seen_if: dict[tuple[str, str], str] = {}
        seen_addr: dict[Address, str] = {}
        for i, item in enumerate(value):
            where = f"links[{i}]"
            item = self.obj(item, where, {"a", "b"}, required=("a", "b"))
            if item is None or "a" not in item or "b" not in item:
                continue
            a = self.endpoint(item["a"], f"{where}.a", known, seen_if, seen_addr)
            b = self.endpoint(item["b"], f"{where}.b", known, seen_if, seen_addr)
            if a and b:
                if a.host == b.host:
                    self.err(where, f"both ends are on host {a.host!r}")
                out.append(Link(a, b))
        return out

    def endpoint(self, value: Any, where: str, known: set[str], seen_if: dict, seen_addr: dict) -> Endpoint | None:
        ep = self.obj(value, where, _ENDPOINT_KEYS, required=("host", "ifname"))
        if ep is None:
            return None
        ok = True
        host = self.string(ep.get("host"), f"{where}.host") if "host" in ep else None
        if host is not None and not self.known_host(host, known, f"{where}.host"):
            ok = False
        ifname = self.string(ep.get("ifname"), f"{where}.ifname") if "ifname" in ep else None
        if ifname is not None:
            if not IFNAME_RE.match(ifname) or ifname == "lo":
                self.err(
                    f"{where}.ifname",
                    f"{ifname!r}: use 1-{IFNAME_MAX} characters from A-Z a-z 0-9 _ - (and not 'lo')",
                )
                ok = False
            elif host is not None:
                other = seen_if.get((host, ifname))
                if other:
                    self.err(f"{where}.ifname", f"{ifname!r} already used on host {host!r} at {other}")
                    ok = False
                seen_if[(host, ifname)] = where
        addresses: list[Interface] = []
        raw = ep.get("addresses", [])
        if not isinstance(raw, list):
            self.err(f"{where}.addresses", f"expected a list, got {type(raw).__name__}")
            raw = []
        for j, text in enumerate(raw):
            aw = f"{where}.addresses[{j}]"
            addr = self.interface(text, aw)
            if addr is None:
                ok = False
                continue
            other = seen_addr.get(addr.ip)
            if other:
                self.err(aw, f"{addr.ip} is already used at {other}")
                ok = False
            seen_addr[addr.ip] = aw
            addresses.append(addr)
        if host is None or ifname is None or host not in known:
            return None
        endpoint = Endpoint(host=host, ifname=ifname, addresses=tuple(addresses))
        self.seen_endpoints.append(endpoint)
        return endpoint if ok else None

    def interface(self, text: Any, where: str) -> Interface | None:
        if not isinstance(text, str) or "/" not in text:
            self.err(where, f"{text!r}: expected an address with its prefix length, like 192.168.1.10/24")
            return None
        try:
            return ip_interface(text)
        except ValueError as err:
            self.err(where, str(err))
            return None

    def routes(self, value: Any, known: set[str], ifnames: dict, networks: dict) -> list[Route]:
        out: list[Route] = []
        if not isinstance(value, list):
            self.err("routes", f"expected a list, got {type(value).__name__}")
            return out
        for i, item in enumerate(value):
            where = f"routes[{i}]"
            item = self.obj(item, where, _ROUTE_KEYS, required=("host", "to"))
            if item is None:
                continue
            route = self.route(item, where, known, ifnames, networks)
            if route is not None:
                out.append(route)
        return out

    def route(self, item: dict, where: str, known: set[str], ifnames: dict, networks: dict) -> Route | None:
        host = self.string(item.get("host"), f"{where}.host") if "host" in item else None
        if host is not None and not self.known_host(host, known, f"{where}.host"):
            return None
        if "via" not in item and "dev" not in item:
            self.err(where, "needs 'via', 'dev' or both")
            return None
        via: Address | None = None
        if "via" in item:
            via_text = self.string(item["via"], f"{where}.via")
            if via_text is None:
                return None
            try:
                via = ip_address(via_text)
            except ValueError:
                self.err(f"{where}.via", f"{item['via']!r} is not an IP address")
                return None
        dev = None
        if "dev" in item:
            dev = self.string(item["dev"], f"{where}.dev")
            if dev is not None and host is not None and self.links_ok and dev not in ifnames.get(host, set()):
                self.err(f"{where}.dev", f"host {host!r} has no interface {dev!r}")
                return None
        to_text = self.string(item.get("to"), f"{where}.to") if "to" in item else None
        if to_text is None or host is None:
            return None
        if to_text == "default":
            to: Network = ip_network("::/0" if via is not None and via.version == 6 else "0.0.0.0/0")
        else:
            try:
                to = ip_network(to_text)
            except ValueError as err:
                self.err(f"{where}.to", f"{to_text!r}: {err} (or use \"default\")")
                return None
        if via is not None:
            if via.version != to.version:
                self.err(f"{where}.via", f"{via} is IPv{via.version} but 'to' is IPv{to.version}")
                return None
            if self.links_ok and not any(via in addr.network for addr in networks.get(host, [])):
                self.err(f"{where}.via", f"{via} is not on any network of host {host!r}")
                return None
        return Route(host=host, to=to, via=via, dev=dev)

    def commands(self, value: Any, known: set[str]) -> dict[str, tuple[tuple[str, ...], ...]]:
        out: dict[str, tuple[tuple[str, ...], ...]] = {}
        if not isinstance(value, dict):
            self.err("commands", f"expected an object of host name -> list of commands, got {type(value).__name__}")
            return out
        for host, cmds in value.items():
            where = f"commands.{host}"
            if not self.known_host(host, known, where):
                continue
            if not isinstance(cmds, list):
                self.err(where, f"expected a list of commands, got {type(cmds).__name__}")
                continue
            argvs = []
            for j, cmd in enumerate(cmds):
                argv = self.command(cmd, f"{where}[{j}]")
                if argv:
                    argvs.append(argv)
            out[host] = tuple(argvs)
        return out

    def command(self, cmd: Any, where: str) -> tuple[str, ...] | None:
        if isinstance(cmd, str):
            try:
                argv = shlex.split(cmd)
            except ValueError as err:
                self.err(where, f"cannot split {cmd!r}: {err}")
                return None
        elif isinstance(cmd, list) and all(isinstance(x, str) for x in cmd):
            argv = list(cmd)
        else:
            self.err(where, "expected a string or a list of strings")
            return None
        if not argv or not argv[0]:
            self.err(where, "empty command")
            return None
        return tuple(argv)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
