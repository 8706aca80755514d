"""Process-wide defaults set by :func:`klime.configure`."""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["defaults"]


class _Defaults:
    on_error: Optional[Callable[..., Any]] = None
    on_success: Optional[Callable[..., Any]] = None


defaults = _Defaults()
