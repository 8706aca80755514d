"""Keeping a spool private to the user that runs the app, and to one project.

A spool holds events (user ids, traits, properties) and is read back and *sent with this
process's write key*. So klime only uses a spool directory that nobody else can plant files
in or read from:

- the directory (and its ``owners/``) must be a real directory, not a symlink, owned by
  the effective uid, and not writable by group or others (:func:`check_directory`);
- every file klime uses there (``spool.sqlite3*``, ``open.lock``, ``owners/*``) must be a
  regular file owned by the effective uid, not a symlink; klime's own files that are
  readable by others (left by an older klime, created under a loose umask) are made 0600;
- files klime creates are created 0600 (:func:`create_private`), directories 0700.

Anything else raises :class:`~klime.errors.SpoolUnavailable` with reason ``"unsafe"``; the
spool transport then falls back to the memory queue with one warning. The directory checks
are race-free for the entries inside (only the owner can add, rename or remove entries of a
directory that group and others cannot write); a path *above* the spool directory that
another user can write is outside what klime can check (see docs/spool.md, Security).

Also here: :func:`project_id`, the fingerprint that ties rows to one endpoint and write key,
and :func:`valid_event`, the check every adopted row passes before it can be sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Optional

from .._config import MAX_EVENT_BYTES
from ..errors import SpoolUnavailable

__all__ = [
    "project_id",
    "DEFAULT_PROJECT",
    "check_directory",
    "check_dir",
    "create_private",
    "valid_event",
    "KNOWN_TYPES",
    "OPEN_FLAGS",
    "describe_invalid",
]

#: The project of a spool opened without one (the rows of every such process are one project).
DEFAULT_PROJECT = "default"
#: Event types a spooled row may have.
KNOWN_TYPES = frozenset({"track", "identify", "group"})
#: Flags for every ``os.open`` of a file in the spool: never follow a planted symlink.
OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_PROJECT_HEX = 32  # 128 bits of sha256
_NO_KEY = "\0klime:no-write-key"
_OWNERS_DIR = "owners"
_FILE_PREFIXES = ("spool.sqlite3", "open.lock")


def project_id(endpoint: str, write_key: Optional[str]) -> str:
    """The fingerprint of the project a spooled event belongs to: the first 32 hex digits of
    sha256 over the endpoint (surrounding spaces and trailing slashes removed) and the write
    key (a marker instead for a sender without a key, ``write_key=None``). Never contains
    the key, and the key cannot be recovered from it. Pure; thread-safe."""
    if not isinstance(endpoint, str):
        raise TypeError("endpoint must be a string")
    if write_key is not None and not isinstance(write_key, str):
        raise TypeError("write_key must be a string or None")
    material = "klime-spool-project\0" + endpoint.strip().rstrip("/") + "\0"
    material += _NO_KEY if write_key is None else "key:" + write_key
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:_PROJECT_HEX]


def _unsafe(directory: str, why: str) -> SpoolUnavailable:
    return SpoolUnavailable(
        f"klime spool {directory}: refused, {why} (a spool must be private to the user running the app)",
        "unsafe",
        directory,
    )


def _lstat_not_a_link(directory: str, path: str) -> Optional[os.stat_result]:
    """``os.lstat(path)``, None when it does not exist; SpoolUnavailable when it cannot be
    looked at, or is a symbolic link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SpoolUnavailable(
            f"klime spool {directory}: cannot look at {path} ({exc.strerror})", "unwritable", directory
        ) from exc
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(directory, f"{path} is a symbolic link")
    return st


def check_dir(directory: str, path: str) -> None:
    """Raise SpoolUnavailable unless ``path`` (the spool ``directory`` or a directory in it)
    is missing or a real directory owned by this user that group and others cannot write."""
    st = _lstat_not_a_link(directory, path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolUnavailable(f"klime spool {directory}: {path} is not a directory", "unwritable", directory)
    euid = os.geteuid()
    if st.st_uid != euid:
        raise _unsafe(directory, f"{path} is owned by uid {st.st_uid}, not by this process's uid {euid}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _unsafe(directory, f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _check_file(directory: str, path: str, *, fix: bool) -> None:
    st = _lstat_not_a_link(directory, path)
    if st is None:
        return  # gone meanwhile (a sibling's lock file): nothing to check
    if not stat.S_ISREG(st.st_mode):
        raise _unsafe(directory, f"{path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise _unsafe(directory, f"{path} is owned by uid {st.st_uid}")
    if fix and st.st_mode & 0o077:
        try:  # not a symlink (checked) and nobody else can swap it (the directory is ours)
            os.chmod(path, 0o600)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _unsafe(directory, f"{path} is readable by others and cannot be made private") from exc


def check_directory(directory: str, *, fix: bool = True) -> None:
    """Raise SpoolUnavailable(``"unsafe"``) unless ``directory`` is private to this user (see
    the module); ``fix`` makes klime's own files that others can read 0600. A missing
    directory passes (nothing to check). Blocks for a few ``lstat`` (one per file: owners'
    lock files included); thread-safe."""
    check_dir(directory, directory)
    owners = os.path.join(directory, _OWNERS_DIR)
    check_dir(directory, owners)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpoolUnavailable(
            f"klime spool {directory}: cannot list it ({exc.strerror})", "unwritable", directory
        ) from exc
    for name in names:
        if name.startswith(_FILE_PREFIXES):
            _check_file(directory, os.path.join(directory, name), fix=fix)
    try:
        entries = os.listdir(owners)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise SpoolUnavailable(
            f"klime spool {directory}: cannot list {owners} ({exc.strerror})", "unwritable", directory
        ) from exc
    for name in entries:
        _check_file(directory, os.path.join(owners, name), fix=fix)


def create_private(path: str) -> bool:
    """Create ``path`` empty with mode 0600 whatever the umask, never through a symlink;
    True when it was created, False when it existed. Raises OSError."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


def valid_event(body: object) -> bool:
    """True when ``body`` (a spooled row) is an encoded event klime could have written: bytes
    of at most MAX_EVENT_BYTES, a JSON object with a known ``type`` and a non-empty string
    ``messageId``. Never raises (deep nesting, bad UTF-8 and non-bytes are False)."""
    if not isinstance(body, bytes) or len(body) > MAX_EVENT_BYTES:
        return False
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(event, dict):
        return False
    message_id = event.get("messageId")
    return event.get("type") in KNOWN_TYPES and isinstance(message_id, str) and bool(message_id)


def describe_invalid(body: object) -> bytes:
    """What to hand to ``on_error`` for a row that failed :func:`valid_event`: the row itself
    when it is a JSON object (decodable), else a small object naming its size."""
    if isinstance(body, bytes) and len(body) <= MAX_EVENT_BYTES:
        try:
            if isinstance(json.loads(body), dict):
                return body
        except (ValueError, RecursionError):
            pass
    size = len(body) if isinstance(body, (bytes, str)) else 0
    return json.dumps({"invalidSpooledRow": {"bytes": size}}).encode("ascii")
