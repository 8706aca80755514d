"""AWS Lambda: ``@klime_lambda`` sends a handler's events before the runtime freezes.

``lambda`` is a Python keyword, so this package cannot be named in an ``import``
statement; use ``from klime import klime_lambda`` (or ``klime.integrations``), or
``importlib.import_module("klime.integrations.lambda")``::

    import klime
    from klime import klime_lambda

    @klime_lambda
    def handler(event, context):
        klime.track("Order Placed", {"total": 42}, user_id=event["user"])
        return {"ok": True}

The SQS forwarder (``make_sqs_forwarder``, ``sqs_forwarder_handler``) lives in
``.forwarder`` and is imported on first access only, so importing this package never
imports boto3. The decorator is defined in ``klime.integrations._lambda`` (type checkers
cannot follow an import of a package named ``lambda``); the private modules here are
klime's internal extension (``_extension``) and its client of Lambda's Extensions API
(``_extensions_api``), imported only by ``after_response=True``.

May import: the standard library, the decorator's module ``klime.integrations._lambda`` and
(lazily, through importlib) its own ``forwarder``; never the ``klime`` package.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._lambda import LambdaDecorator, klime_lambda

__all__ = ["LambdaDecorator", "klime_lambda", "make_sqs_forwarder", "sqs_forwarder_handler"]

_FORWARDER_NAMES = ("make_sqs_forwarder", "sqs_forwarder_handler")


def __getattr__(name: str) -> Any:
    # The SQS forwarder needs boto3: import it only when it is asked for.
    if name in _FORWARDER_NAMES:
        forwarder = importlib.import_module(__name__ + ".forwarder")
        return getattr(forwarder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
