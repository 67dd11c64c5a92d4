"""``nfgate apply --confirm SECONDS``: roll back unless ``nfgate confirm`` comes in time.

For a change made over SSH (Junos' "commit confirmed"): if the new ruleset
cuts the operator off, the router goes back to the previous one by itself.

``arm`` keeps the config text of the ruleset in place (``state.applied``,
recorded by every apply, run and reload) as ``rollback.toml``, writes
``confirm.json`` (a token, the deadline, the previous backend) into the
state directory, and starts a timer process in its own session, so that
the SSH session's end does not end it: ``python -m firewall.confirm
STATE_DIR TOKEN``. ``nfgate confirm`` deletes ``confirm.json``; the timer,
at the deadline, renames it first. Whichever of the two moves the file
wins, so a confirm and a rollback never both happen. With no ruleset
before, the rollback is a flush.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from firewall import backend as be
from firewall import state
from firewall.config import Config, loads
from firewall.errors import NfgateError, UsageError
from firewall.rules import build

PENDING, ROLLBACK, LOG = "confirm.json", "rollback.toml", "confirm.log"
POLL = 0.2  # seconds between the timer's looks for a confirm


def pending(config: Config) -> dict | None:
    try:
        return json.loads((state.directory(config) / PENDING).read_text())
    except (OSError, ValueError):
        return None


def arm(config: Config, seconds: float, previous: tuple[str, str] | None) -> tuple[float, int]:
    """Start the timer for a ruleset just applied; (deadline, timer pid)."""
    where = state.ensure(config)
    rollback = where / ROLLBACK
    if previous is None:
        rollback.unlink(missing_ok=True)
    else:
        rollback.write_text(previous[0])
        rollback.chmod(0o600)
    token = secrets.token_hex(8)
    deadline = time.time() + seconds
    record = {"token": token, "deadline": deadline, "backend": previous[1] if previous else None,
              "previous": previous is not None}
    (where / PENDING).write_text(json.dumps(record) + "\n")
    with open(where / LOG, "a") as log:
        timer = subprocess.Popen([sys.executable, "-m", "firewall.confirm", str(where), token],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return deadline, timer.pid


def confirm(config: Config) -> str:
    where = state.directory(config)
    try:
        os.unlink(where / PENDING)
    except FileNotFoundError:
        raise UsageError("nothing to confirm: no apply --confirm is pending (or it already rolled back: "
                         f"see {where / LOG})") from None
    (where / ROLLBACK).unlink(missing_ok=True)
    return "confirmed: the new ruleset stays"


def _timer(where: Path, token: str) -> int:
    path = where / PENDING
    while True:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return 0  # confirmed
        if record.get("token") != token:
            return 0  # a newer apply --confirm owns it
        left = float(record["deadline"]) - time.time()
        if left <= 0:
            break
        time.sleep(min(POLL, left))
    claimed = where / (PENDING + ".rollback")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return 0  # confirmed at the last moment
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        if record.get("previous"):
            text = (where / ROLLBACK).read_text()
            config = loads(text, where / ROLLBACK)
            report = be.apply(build(config), record["backend"])
            state.record_applied(config, text, record["backend"])
            lines = report.actions
        else:
            lines = be.flush()
            for name in (state.APPLIED, state.APPLIED_META):
                (where / name).unlink(missing_ok=True)
    except NfgateError as err:
        print(f"{stamp} nfgate confirm: no confirm in time, and the rollback failed: {err}", flush=True)
        return 1
    finally:
        claimed.unlink(missing_ok=True)
    print(f"{stamp} nfgate confirm: no confirm in time: rolled back to the previous ruleset", flush=True)
    for line in lines:
        print(f"{stamp}   {line}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - the timer process
    sys.exit(_timer(Path(sys.argv[1]), sys.argv[2]))
