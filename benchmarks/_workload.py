"""The benchmark's workload, one definition for every SDK.

N track calls named ``Order Completed``, user ``user_<i % 1000>``, each with 6 properties:
two strings, an int, a float, a bool and a nested dict. The properties dict is built fresh
for every call, outside the timed region (the app owns that cost, and no SDK may share a
dict between events).
"""

from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["EVENT", "USERS", "properties", "users"]

EVENT = "Order Completed"
USERS = 1000

_PLANS = ("free", "pro", "team", "enterprise")


def users() -> List[str]:
    """The user ids, ``user_0`` .. ``user_999`` (built once, before timing)."""
    return [f"user_{i}" for i in range(USERS)]


def properties(i: int) -> Dict[str, Any]:
    """The properties of call ``i``: 6 keys, with strings, int, float, bool and a nested dict."""
    return {
        "plan": _PLANS[i & 3],
        "path": "/checkout/confirm",
        "items": i % 7 + 1,
        "total": (i % 500) * 1.25 + 0.99,
        "first_order": i % 10 == 0,
        "cart": {"currency": "EUR", "coupon": None, "sku": "SKU-1042", "quantity": 2},
    }
