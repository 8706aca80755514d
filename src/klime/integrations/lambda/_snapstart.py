"""SnapStart: send the events recorded during Init before Lambda takes the snapshot.

Events recorded during Init would be in the snapshot and sent again by every sandbox
restored from it, so :func:`install_snapshot_flush` registers a before-snapshot hook
(``snapshot_restore_py``, part of Lambda's Python runtimes) that sends them first. The
decorator (:mod:`klime.integrations._lambda`) installs it under SnapStart only.

May import: the standard library and klime's layers below the integrations.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

from ..._deadline import Deadline
from ..._logging import log

__all__ = ["SNAPSHOT_FLUSH_TIMEOUT_S", "install_snapshot_flush"]

#: Longest the before-snapshot flush of SnapStart may take, seconds.
SNAPSHOT_FLUSH_TIMEOUT_S = 5.0

_lock = threading.Lock()
_snapshot_hook_installed = False


def install_snapshot_flush(flush_all: Callable[[Optional[float]], Tuple[int, int]]) -> bool:
    """Under SnapStart, register (once) a before-snapshot hook that calls
    ``flush_all(timeout)`` — it returns (sent, unsent) — so that events recorded during
    Init are sent once, before the snapshot, not by every sandbox restored from it.
    Returns whether a hook is registered. Thread-safe; non-blocking."""
    global _snapshot_hook_installed
    with _lock:
        if _snapshot_hook_installed:
            return True
        try:
            import snapshot_restore_py  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError:
            log.warning_once(
                "snapstart-no-hooks",
                "klime: SnapStart is on but snapshot_restore_py is missing: events recorded during "
                "Init may be sent again by every sandbox restored from the snapshot",
            )
            return False

        def klime_before_snapshot() -> None:
            deadline = Deadline.after(SNAPSHOT_FLUSH_TIMEOUT_S)
            try:
                sent, unsent = flush_all(deadline.remaining())
            except Exception:
                log.exception("klime: the before-snapshot flush failed")
                return
            if unsent:
                log.warning(
                    "klime: %d events recorded during Init could not be sent before the SnapStart "
                    "snapshot; every sandbox restored from it will send them (with the same messageId)",
                    unsent,
                )
            log.debug("klime: %d events sent before the snapshot", sent)

        snapshot_restore_py.register_before_snapshot(klime_before_snapshot)
        _snapshot_hook_installed = True
        return True
