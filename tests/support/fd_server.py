"""A server process on a socket the test bound itself (127.0.0.1, a free port).

Requests wait in the listen backlog until the server is up: no port race and no polling.
Shared by the framework example tests (gunicorn, uvicorn, Django's runners)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union


def gunicorn_options() -> List[str]:
    """Recent gunicorn (27 here) opens a control socket at a fixed path in $HOME: keep
    parallel runs from sharing it."""
    import gunicorn.config

    names = {setting.name for setting in gunicorn.config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


class FdServer:
    """Runs ``argv`` (``{fd}`` replaced by the listening socket's descriptor) in ``cwd``."""

    def __init__(self, argv: List[str], *, cwd: Union[str, Path], env: Dict[str, str], log: Path) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.log = log
        fd = self.listener.fileno()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [arg.replace("{fd}", str(fd)) for arg in argv],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
            )

    def request(
        self,
        method: str,
        path: str,
        payload: Optional[Any] = None,
        *,
        form: Optional[Dict[str, str]] = None,
    ) -> Tuple[int, Any]:
        """One request on a new connection; ``payload`` is sent as JSON, ``form`` as a form.
        Returns the status and the parsed JSON answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers: Dict[str, str] = {}
            body: Optional[str] = None
            if payload is not None:
                body, headers = json.dumps(payload), {"Content-Type": "application/json"}
            elif form is not None:
                body = urllib.parse.urlencode(form)
                headers = {"Content-Type": "application/x-www-form-urlencoded"}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (what systemd, Kubernetes and Docker send) and wait for the exit.

        uvicorn (0.29 and later) re-raises the signal once it has shut down, so it exits
        killed by SIGTERM (-15), without running ``atexit`` hooks; gunicorn exits with 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server ignored SIGTERM:\n{self.log.read_text()}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.listener.close()
