"""Trivial Lambda handlers used by tests/test_lambda_emulator.py.

Run by awslambdaric in a child process (cwd = this folder). Importing it
starts a marker thread only when KLIME_TEST_MARKER_FILE is set: the thread
appends one line to that file every 20 ms, so a frozen process is visible as
a file that stops growing.

With KLIME_TEST_EXTENSION=<name>, importing it also registers an internal
extension of that name (events: KLIME_TEST_EXTENSION_EVENTS, comma-separated,
default INVOKE) and starts its thread: for each event it waits
KLIME_TEST_EXTENSION_DELAY seconds, appends ``<requestId> <time.monotonic()>``
to KLIME_TEST_EXTENSION_LOG, then calls next again. KLIME_TEST_EXTENSION_FAIL
set to ``init`` posts /extension/init/error right after registering; set to
``exit`` posts /extension/exit/error on the first INVOKE instead of calling
next. Standard library only.
"""

import http.client
import json
import os
import signal
import threading
import time

_EXT_API = "/2020-01-01/extension"


def _extension_call(method, path, body=None, headers=None):
    """One request to the Extensions API; returns (status, headers, parsed body)."""
    conn = http.client.HTTPConnection(os.environ["AWS_LAMBDA_RUNTIME_API"])
    try:
        conn.request(
            method, _EXT_API + path, body=None if body is None else json.dumps(body), headers=headers or {}
        )
        response = conn.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def register_extension(name, events):
    return _extension_call("POST", "/register", {"events": events}, {"Lambda-Extension-Name": name})


EXTENSION = {}  # what the registration at import answered


def _extension_loop(identifier):
    delay = float(os.environ.get("KLIME_TEST_EXTENSION_DELAY", "0"))
    log_path = os.environ.get("KLIME_TEST_EXTENSION_LOG")
    fail = os.environ.get("KLIME_TEST_EXTENSION_FAIL")
    ident = {"Lambda-Extension-Identifier": identifier}
    for _ in range(100000):  # bounded: far more invocations than any test makes
        status, _headers, event = _extension_call("GET", "/event/next", headers=ident)
        if status != 200:
            return
        if fail == "exit":
            error = {"errorType": "Extension.Test", "errorMessage": "exit on purpose"}
            _extension_call(
                "POST",
                "/exit/error",
                error,
                dict(ident, **{"Lambda-Extension-Function-Error-Type": "Extension.Test"}),
            )
            return
        time.sleep(delay)
        if log_path:
            with open(log_path, "a") as f:
                f.write("%s %s %.6f\n" % (event["eventType"], event.get("requestId", "-"), time.monotonic()))


_EXT_NAME = os.environ.get("KLIME_TEST_EXTENSION")
if _EXT_NAME:
    _events = os.environ.get("KLIME_TEST_EXTENSION_EVENTS", "INVOKE").split(",")
    _status, _headers, _body = register_extension(_EXT_NAME, [e for e in _events if e])
    EXTENSION.update(status=_status, body=_body, identifier=_headers.get("Lambda-Extension-Identifier"))
    if _status == 200 and os.environ.get("KLIME_TEST_EXTENSION_FAIL") == "init":
        _extension_call(
            "POST",
            "/init/error",
            {"errorType": "Extension.Test", "errorMessage": "init failed on purpose"},
            {
                "Lambda-Extension-Identifier": EXTENSION["identifier"],
                "Lambda-Extension-Function-Error-Type": "Extension.Test",
            },
        )
    elif _status == 200:
        threading.Thread(
            target=_extension_loop, args=(EXTENSION["identifier"],), name="test-extension", daemon=True
        ).start()

_MARKER = os.environ.get("KLIME_TEST_MARKER_FILE")


def _marker_loop(path):
    n = 0
    while True:
        n += 1
        with open(path, "a") as f:
            f.write("%d %.6f\n" % (n, time.time()))
        time.sleep(0.02)


if _MARKER:
    threading.Thread(target=_marker_loop, args=(_MARKER,), name="marker", daemon=True).start()

_TERM_FILE = os.environ.get("KLIME_TEST_SIGTERM_FILE")


def _on_sigterm(signum, frame):
    with open(_TERM_FILE, "w") as f:
        f.write("sigterm %d\n" % os.getpid())
    os._exit(0)


if _TERM_FILE:
    # Runs only if the main thread executes Python code: with
    # AWS_EXECUTION_ENV=AWS_Lambda_python3.12+ awslambdaric waits for the next
    # event in a worker thread, so the main thread can take the signal.
    signal.signal(signal.SIGTERM, _on_sigterm)


def echo(event, context):
    return {
        "echo": event,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "request_id": context.aws_request_id,
        "pid": os.getpid(),
    }


def boom(event, context):
    raise ValueError("boom: %r" % (event,))


def context_info(event, context):
    keys = [
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_LAMBDA_RUNTIME_API",
        "AWS_EXECUTION_ENV",
        "AWS_REGION",
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "_X_AMZN_TRACE_ID",
        "KLIME_TEST_EXTRA",
    ]
    return {
        "env": {k: os.environ.get(k) for k in keys},
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "invoked_function_arn": context.invoked_function_arn,
        "aws_request_id": context.aws_request_id,
        "pgid": os.getpgid(0),
        "pid": os.getpid(),
    }


def _marker_size():
    try:
        return os.path.getsize(_MARKER)
    except (TypeError, OSError):
        return -1


def marker(event, context):
    """Wait (bounded) until the marker file grows during this invocation."""
    start = _marker_size()
    deadline = time.monotonic() + float(event.get("wait_s", 2.0))
    while _marker_size() <= start and time.monotonic() < deadline:
        time.sleep(0.005)
    return {"pid": os.getpid(), "size_at_start": start, "size_at_end": _marker_size()}


def sleepy(event, context):
    time.sleep(float(event.get("s", 0)))
    return {"slept": event.get("s", 0), "pid": os.getpid()}


def die(event, context):
    os._exit(int(event.get("code", 3)))


def extension_info(event, context):
    """What the registration at import answered."""
    return {"extension": EXTENSION, "pid": os.getpid(), "request_id": context.aws_request_id}


def register_late(event, context):
    """Try to register an extension during an invocation (too late: after Init)."""
    status, _headers, body = register_extension(event.get("name", "late"), event.get("events", ["INVOKE"]))
    return {"status": status, "body": body}
