"""An external Lambda extension for tests/test_lambda_emulator.py (started by the emulator
as its own process, as Lambda starts the executables in /opt/extensions).

It registers under its file name for INVOKE and SHUTDOWN, then for every event appends one
JSON line ``{"event": ..., "at": time.monotonic()}`` to KLIME_TEST_EXTERNAL_LOG and calls
next again; it exits after SHUTDOWN. Standard library only.
"""

import http.client
import json
import os
import sys
import time

API = "/2020-01-01/extension"


def call(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(os.environ["AWS_LAMBDA_RUNTIME_API"])
    try:
        conn.request(
            method, API + path, body=None if body is None else json.dumps(body), headers=headers or {}
        )
        response = conn.getresponse()
        raw = response.read()
        return (
            response.status,
            response.getheader("Lambda-Extension-Identifier"),
            json.loads(raw) if raw else None,
        )
    finally:
        conn.close()


def main():
    name = os.path.basename(__file__)
    status, identifier, _ = call(
        "POST", "/register", {"events": ["INVOKE", "SHUTDOWN"]}, {"Lambda-Extension-Name": name}
    )
    if status != 200:
        sys.exit("registration refused: %s" % status)
    log_path = os.environ.get("KLIME_TEST_EXTERNAL_LOG")
    for _ in range(100000):  # bounded
        status, _, event = call("GET", "/event/next", headers={"Lambda-Extension-Identifier": identifier})
        if status != 200:
            sys.exit("next refused: %s" % status)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({"event": event, "at": time.monotonic()}) + "\n")
        if event["eventType"] == "SHUTDOWN":
            return


if __name__ == "__main__":
    main()
