"""Integrations with runtimes and frameworks. Each is optional and import-light."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers; at run time the names resolve lazily below
    from ._lambda import klime_lambda
    from .cloud_functions import klime_cloud_function

__all__ = ["klime_cloud_function", "klime_lambda", "make_sqs_forwarder", "sqs_forwarder_handler"]


def __getattr__(name: str) -> Any:
    # ``lambda`` is a keyword, so its package is reached through importlib.
    if name in ("klime_lambda", "make_sqs_forwarder", "sqs_forwarder_handler"):
        import importlib

        return getattr(importlib.import_module("klime.integrations.lambda"), name)
    if name == "klime_cloud_function":
        from .cloud_functions import klime_cloud_function

        return klime_cloud_function
    raise AttributeError(name)
