"""boto3, imported on first use: the install hint, the error when it is missing, and how
to read a botocore ``ClientError``. Shared by the SQS sender (a sender, layer 1) and
:mod:`klime.aws` (a tool on top); nothing here imports boto3 at import time.

May import: the model (``errors``) only.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

from .errors import ConfigurationError

__all__ = ["INSTALL_HINT", "MissingDependencyError", "client_error_info", "require_boto3"]

#: What to install for klime's AWS pieces.
INSTALL_HINT = 'pip install "klime[aws]"'

class MissingDependencyError(ConfigurationError, ImportError):
    """An optional dependency (boto3, for the AWS pieces) is not installed.

    A :class:`~klime.ConfigurationError` (and so a :class:`~klime.KlimeError`) and an
    :class:`ImportError` at once; the message says what to ``pip install``.
    """


def require_boto3(what: str = "this klime feature") -> Any:
    """Import and return the ``boto3`` module, or raise :class:`MissingDependencyError`.

    Blocks while boto3 is imported the first time (a few hundred ms); thread-safe.
    """
    try:
        import boto3
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs boto3, which is not installed: {INSTALL_HINT}") from exc
    return boto3


# ------------------------------------------------------------------------------ AWS errors

_XML_MESSAGE = re.compile(r"<Message>(.*?)</Message>", re.S)
_XML_CODE = re.compile(r"<Code>(.*?)</Code>", re.S)


def client_error_info(exc: BaseException) -> Tuple[str, str, Optional[int]]:
    """``(code, message, http_status)`` of a botocore ``ClientError`` (empty strings if absent).

    Some endpoints (moto among them) wrap a query-protocol XML error in a JSON-protocol
    answer; the code and message are then read from the XML.
    """
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")
    if "<Message>" in message:
        inner_code = _XML_CODE.search(message)
        inner = _XML_MESSAGE.search(message)
        if inner_code and (not code or code.isdigit()):
            code = inner_code.group(1).strip()
        message = inner.group(1).strip() if inner else message
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if not isinstance(status, int) and code.isdigit():
        status = int(code)
    return code, message[:300], status if isinstance(status, int) else None
