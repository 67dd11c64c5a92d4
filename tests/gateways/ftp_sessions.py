"""Many FTP sessions at once, for the worker-crash test (tests/gateways/test_ftp_workers_netns.py); stdlib only.

    python ftp_sessions.py SERVER COUNT FILE SHA256

Opens COUNT control sessions (anonymous login, binary), then starts, on
each, a passive download of pub/FILE and reads its first chunk; prints
``transferring`` once every session is that far (or failed on the way).
Then it waits for a line on stdin, reads the rest of each download and the
226, checks the bytes against SHA256, and prints one JSON object:
``{"ok": n, "failed": n, "errors": [...]}``.
"""

from __future__ import annotations

import ftplib
import hashlib
import json
import sys
import threading

TIMEOUT = 20.0
CHUNK = 1 << 16


def main() -> None:
    server, count, name, digest = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sessions: list[ftplib.FTP | None] = []
    errors: list[str] = []
    for _ in range(count):
        try:
            ftp = ftplib.FTP(server, timeout=TIMEOUT)
            ftp.login()
            ftp.voidcmd("TYPE I")
            sessions.append(ftp)
        except (OSError, ftplib.Error) as exc:
            sessions.append(None)
            errors.append(f"login: {exc!r}")
    started = threading.Barrier(count + 1, timeout=TIMEOUT * 2)
    resume = threading.Event()
    results: list[bool] = []
    lock = threading.Lock()

    def transfer(ftp: ftplib.FTP | None) -> None:
        ok, why = False, "no session"
        data = None
        try:
            if ftp is not None:
                data = ftp.transfercmd(f"RETR pub/{name}")
                h = hashlib.sha256(data.recv(CHUNK))
        except (OSError, ftplib.Error) as exc:
            why, data = f"start: {exc!r}", None
        try:
            started.wait()
        except threading.BrokenBarrierError:
            pass
        resume.wait(TIMEOUT * 2)
        if data is not None:
            try:
                while chunk := data.recv(CHUNK):
                    h.update(chunk)
                data.close()
                ftp.voidresp()  # the 226: the control connection is alive
                ok, why = h.hexdigest() == digest, "digest"
            except (OSError, ftplib.Error, EOFError) as exc:
                why = f"finish: {exc!r}"
        with lock:
            results.append(ok)
            if not ok:
                errors.append(why)

    threads = [threading.Thread(target=transfer, args=(ftp,)) for ftp in sessions]
    for t in threads:
        t.start()
    started.wait()
    print("transferring", flush=True)
    sys.stdin.readline()
    resume.set()
    for t in threads:
        t.join(TIMEOUT * 3)
    print(json.dumps({"ok": sum(results), "failed": count - sum(results), "errors": errors[:10]}), flush=True)


if __name__ == "__main__":
    main()
