"""The signalling key file: 32 random bytes that only root can read (DESIGN invariant 5).

``load_or_create_key(path)`` returns the key, creating it on first start.

- Creation is atomic and never replaces a key: the bytes are written to a
  fresh temporary file (``O_EXCL``, mode 0600 from the start, fsynced) that
  is then hard-linked to the final name. ``link`` fails if the name exists,
  where ``rename`` would silently replace it; so when the processor and a
  gateway start at once, the loser reads the winner's key instead of each
  keeping a different one. A crash leaves either no key or a whole key.
- Loading checks the open file descriptor (no window between check and
  read): a regular file, not a symlink (``O_NOFOLLOW``), owned by root (or by
  the process's own user, for tests run unprivileged), with no group or
  other permission bits, exactly ``KEY_SIZE`` bytes. Anything else is refused
  with one line that says what to fix: a key someone else could read lets
  them forge flows and rules; one someone else could write lets them choose
  it.
- Load the key before dropping privileges.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from firewall.errors import NfgateError
from firewall.signalling.codec import KEY_SIZE

KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
_FORBIDDEN_BITS = 0o077  # any permission for group or others
ROOT_UID = 0


class KeyFileError(NfgateError):
    """The signalling key file cannot be used; the message says why and what to do."""


def load_or_create_key(path: Path | str) -> bytes:
    """The key at ``path``; if there is none, a new random one written there first."""
    path = Path(path)
    try:
        return load_key(path)
    except FileNotFoundError:
        pass
    _create(path)
    try:
        return load_key(path)  # ours, or the one a concurrent starter linked first
    except FileNotFoundError:
        raise KeyFileError(f"signalling key {path}: removed just after it was created") from None


def load_key(path: Path | str) -> bytes:
    """The key at ``path``. FileNotFoundError if there is none; KeyFileError if it is unsafe."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise KeyFileError(
                f"signalling key {path}: is a symbolic link; point key_file at the file itself"
            ) from None
        raise KeyFileError(f"signalling key {path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"signalling key {path}: not a regular file")
        if st.st_uid not in (ROOT_UID, os.geteuid()):
            raise KeyFileError(f"signalling key {path}: owned by uid {st.st_uid}, not root; chown root {path}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _FORBIDDEN_BITS:
            raise KeyFileError(
                f"signalling key {path}: mode {mode:04o} gives group or others access; chmod 600 {path}"
            )
        if st.st_size != KEY_SIZE:
            raise KeyFileError(
                f"signalling key {path}: {st.st_size} bytes, expected {KEY_SIZE}; remove it to have a new one made"
            )
        data = _read_at_most(fd, KEY_SIZE)
    except OSError as e:
        raise KeyFileError(f"signalling key {path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:  # it shrank between fstat and read
        raise KeyFileError(f"signalling key {path}: changed while being read; try again")
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks = []
    remaining = limit
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _create(path: Path) -> None:
    parent = path.parent
    tmp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        if not parent.exists():
            parent.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
            os.chmod(parent, KEY_DIR_MODE)  # mkdir's mode passes through the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_FILE_MODE)
        try:
            try:
                os.fchmod(fd, KEY_FILE_MODE)  # exact, whatever the umask
                if os.geteuid() == ROOT_UID:
                    os.fchown(fd, ROOT_UID, ROOT_UID)  # not the group of a setgid directory
                key = secrets.token_bytes(KEY_SIZE)
                written = 0
                while written < KEY_SIZE:
                    written += os.write(fd, key[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process linked its key first: that one is the key
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # the new name survives a crash
        finally:
            os.close(dir_fd)
    except OSError as e:
        where = e.filename or path
        raise KeyFileError(f"signalling key {path}: cannot create it ({where}: {e.strerror})") from None
