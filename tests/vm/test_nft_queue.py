"""nft ``queue`` rules of nfgate's shape deliver packets to a Python netfilterqueue process.

Why in a VM: our hosts' kernel lacks the nft ``queue`` expression
(CONFIG_NFT_QUEUE off), so the nft backend's steering rules can only be proven on
Debian's stock kernel, booted by ``harness`` (one boot for every guest check).
The guest side is ``guest_nft_queue.py``; this module hands it the rulesets and
asserts on what the guest recorded.

Two cases run in the same boot, each in its own namespaces:

- ``handwritten``: ``HANDWRITTEN_RULESET``, the shape nfgate's nft renderer
  uses (an inet table, a raw-priority prerouting chain, a UDP port queued
  fail-open). Always runs: it is the proof that the mechanism works at all.
- ``rendered``: the file named by ``$NFGATE_VM_RULESET`` if set, else the output
  of ``nfgate rules --format nft --config examples/office.toml`` when that
  command exists and succeeds on the host. The guest must load it with
  ``nft -f``; it then finds, by evaluating the loaded ruleset, a UDP datagram the
  ruleset queues. The case is skipped, with the reason, when there is no
  ruleset or no such datagram.

Which ruleset each case used is printed (``pytest -rP`` or ``-s`` shows it) and
repeated in every assertion message.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from . import harness

pytestmark = pytest.mark.vm

GUEST_SCRIPT = Path(__file__).with_name("guest_nft_queue.py")
OFFICE_CONFIG = harness.REPO / "examples" / "office.toml"
RULESET_ENV = "NFGATE_VM_RULESET"
CASES = ("handwritten", "rendered")

HANDWRITTEN_RULESET = """\
table inet nfgate {
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifname "wan0" meta nfproto ipv4 udp dport 2525 counter queue num 0 bypass
    }
}
"""


def rendered_ruleset() -> tuple[str | None, str]:
    """(ruleset text or None, where it came from or why there is none)."""
    override = os.environ.get(RULESET_ENV)
    if override:
        return Path(override).read_text(), f"{override} (from ${RULESET_ENV})"
    nfgate = harness.VENV_BIN / "nfgate"
    if not nfgate.exists():
        return None, f"{nfgate} does not exist"
    if not OFFICE_CONFIG.exists():
        return None, f"{OFFICE_CONFIG} does not exist"
    argv = [str(nfgate), "rules", "--format", "nft", "--config", str(OFFICE_CONFIG)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"`nfgate rules` failed: {err}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return None, f"`nfgate rules` exited {proc.returncode}: {last[:200]}"
    return proc.stdout, "nfgate rules --format nft --config examples/office.toml"


def prepare(out: Path) -> None:
    """Write the rulesets and cases.json for the guest (runs on the host, just before the boot)."""
    payload = f"nfgate-vm-probe {uuid.uuid4().hex}"
    cases = []
    (out / "handwritten.nft").write_text(HANDWRITTEN_RULESET)
    cases.append({"name": "handwritten", "source": "hand-written HANDWRITTEN_RULESET",
                  "ruleset_file": "handwritten.nft", "payload": payload})
    text, source = rendered_ruleset()
    case = {"name": "rendered", "source": source, "ruleset_file": "rendered.nft", "payload": payload}
    if text is None:
        case["skip"] = f"no rendered ruleset: {source}"
    else:
        (out / "rendered.nft").write_text(text)
    cases.append(case)
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")


CHECK = harness.register(harness.GuestCheck(
    name="nft_queue",
    argv=("{python}", str(GUEST_SCRIPT), "run", "{out}"),
    timeout=150,
    prepare=prepare,
))


@pytest.fixture(scope="module")
def guest() -> dict:
    """The guest's result.json for this check, after asserting the guest ran it to the end."""
    res = harness.batch(timeout=harness.BATCH_TIMEOUT)[CHECK.name]
    result_path = res.out / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    print(f"\nnft_queue: guest kernel {result.get('kernel', '?')}, VM run {res.vm.seconds:.1f}s")
    for name, case in result.get("cases", {}).items():
        print(f"  {name}: ruleset from {case['params']['source']} -> {case.get('status')}"
              f"{': ' + case['reason'] if case.get('reason') else ''}")
    # A failed case fails its own tests (see ``ran``); only a guest that did
    # not get through every case fails them all.
    assert set(result.get("cases", {})) == set(CASES) and "error" not in result, (
        f"guest check failed: {result.get('error') or 'no result.json'}\n{harness.describe(res)}"
    )
    result["_describe"] = harness.describe(res)
    return result


def ran(guest: dict, name: str) -> dict:
    """The case's result; skip the test with the guest's reason, or fail it with the guest's error."""
    case = guest["cases"][name]
    if case["status"] == "skipped":
        pytest.skip(f"{name}: {case['reason']}")
    if case["status"] != "ran":
        pytest.fail(f"{name}: {case.get('error', case['status'])}\n"
                    f"ruleset from {case['params']['source']}\n{guest['_describe']}")
    return case


def _context(case: dict) -> str:
    return (f"ruleset from {case['params']['source']}\nprobe={case.get('probe')}\n"
            f"queued={case['queued']}\nsink={case.get('sink')}\n"
            f"selector counter={case.get('selector_counter')} probe counters={case.get('probe_counters')}\n"
            f"{case.get('ruleset_listing', '')}")


def test_guest_runs_the_stock_kernel(guest: dict) -> None:
    assert guest["kernel"].startswith("6.1."), guest["kernel"]


@pytest.mark.parametrize("name", CASES)
def test_matching_datagram_reaches_the_queue(guest: dict, name: str) -> None:
    case = ran(guest, name)
    probe, sent, payload = case["probe"], case["sent_match"], case["params"]["payload"]
    hits = [r for r in case["queued"] if r.get("dport") == probe["port"]]
    assert len(hits) == 1, _context(case)
    hit = hits[0]
    assert (hit["src"], hit["sport"], hit["dst"], hit["dport"]) == (
        sent["src"], sent["sport"], sent["dst"], probe["port"]), _context(case)
    assert hit["proto"] == 17 and hit["payload"] == payload, _context(case)
    # The queue the guest's evaluation of the ruleset predicted, on the right interface.
    assert hit["queue"] == probe["queue"] and hit["indev"] == probe["iifname"], _context(case)
    counter = case["selector_counter"]
    if counter["before"] is not None:
        assert counter["after_match"] - counter["before"] == 1, _context(case)
    # The listener's accept verdict let it on through the hook.
    assert case["probe_counters"][str(probe["port"])] == 1, _context(case)


@pytest.mark.parametrize("name", CASES)
def test_nonmatching_datagram_skips_the_queue(guest: dict, name: str) -> None:
    case = ran(guest, name)
    probe = case["probe"]
    # The probe, later on the same hook, counted it: it passed the queue rules...
    assert case["probe_counters"][str(probe["nonmatch_port"])] == 1, _context(case)
    # ...and the listener, which records before its verdict, never saw it.
    assert not [r for r in case["queued"] if r.get("dport") == probe["nonmatch_port"]], _context(case)
    assert all(r.get("dport") == probe["port"] for r in case["queued"]), _context(case)
    counter = case["selector_counter"]
    if counter["before"] is not None:
        assert counter["after_nonmatch"] == counter["after_match"], _context(case)


def test_handwritten_forwards_both_datagrams_to_the_server(guest: dict) -> None:
    """End to end for the hand-written ruleset, whose forward path is known to be open."""
    case = ran(guest, "handwritten")
    payload, probe = case["params"]["payload"], case["probe"]
    got = {(r["src"], r["dport"], r["payload"]) for r in case["sink"]}
    assert got == {("10.99.0.2", probe["port"], payload),
                   ("10.99.0.2", probe["nonmatch_port"], payload)}, _context(case)
