"""Integrations with runtimes and frameworks. Each is optional and import-light."""

from __future__ import annotations

from typing import Any

__all__ = ["klime_lambda", "klime_cloud_function"]


def __getattr__(name: str) -> Any:
    if name == "klime_lambda":
        import importlib

        return importlib.import_module("klime.integrations.lambda").klime_lambda
    if name == "klime_cloud_function":
        from .cloud_functions import klime_cloud_function

        return klime_cloud_function
    raise AttributeError(name)
