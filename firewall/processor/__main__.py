"""``python -m firewall.processor``: run one packet processor instance.

    python -m firewall.processor --config /etc/nfgate/nfgate.toml --instance 0 \\
        [--control /run/nfgate/processor-0.sock] [--node NODE] [--test-skip-pushes]

The supervisor (``nfgate run``) starts one per entry of ``processor.queues``,
in the router's network namespace, after ``nfgate apply`` and the blind
track. Exit codes: 0 after SIGTERM/SIGINT, 1 runtime failure (privilege,
kernel), 2 usage or config error; errors are one line, never a traceback
(DESIGN invariant 10). Its lines, errors included, take the config's ``[log]``
format (firewall/eventlog.py); once its queue is bound and its sockets serve it
says ``READY=1`` to ``NOTIFY_SOCKET``, which ``nfgate run`` waits for.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from firewall import eventlog
from firewall.config import load
from firewall.errors import NfgateError, UsageError
from firewall.processor.runner import Runner

NAME = "nfgate processor"  # who speaks in its log lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="The nfgate TOML config.")
@click.option("--instance", type=int, required=True, help="Index into processor.queues: which queue to bind.")
@click.option(
    "--control",
    type=click.Path(dir_okay=False),
    default=None,
    help="Control socket path (default /run/nfgate/processor-<queue>.sock).",
)
@click.option("--node", default=None, help="With [ha]: the node of the pair this router is (nfgate run finds it).")
@click.option(
    "--test-skip-pushes",
    is_flag=True,
    help="TEST ONLY: send no NEW_FLOW pushes, so gateways must learn every flow by QUERY. Never in production.",
)
def main(config_path: str, instance: int, control: str | None, node: str | None, test_skip_pushes: bool) -> None:
    """Bind one NFQUEUE and double-NAT the gateway flows it carries (docs/datapath.md)."""
    eventlog.configure_process(NAME)
    log = logging.getLogger("nfgate.processor")
    try:
        config = load(config_path)
        eventlog.configure_process(NAME, config.log.format == "json", level=getattr(logging, config.log.level.upper()))
        if not config.gateways:
            raise UsageError(f"{config_path}: no [[gateway]] configured: there is nothing to process")
        if config.ha is not None:
            if node not in config.ha.nodes:
                raise UsageError(f"--node {node}: [ha] has nodes {', '.join(sorted(config.ha.nodes))}")
            config = config.for_node(node)  # its half of the pool, its address on a host gateway link
        if not 0 <= instance < len(config.processor.queues):
            raise UsageError(f"--instance {instance}: processor.queues has {len(config.processor.queues)} entries")
        runner = Runner(config, instance, control_path=Path(control) if control else None, push=not test_skip_pushes)
        sys.exit(runner.run())
    except NfgateError as err:
        log.error("%s", err)
        sys.exit(err.exit_code)
    except OSError as err:
        log.error("%s", f"{err.strerror or err}" + (f": {err.filename}" if err.filename else ""))
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()  # click exits 2 on bad arguments
