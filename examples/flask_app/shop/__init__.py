"""The klime Flask example: an application factory with a klime client per app.

Serve it with ``gunicorn "shop:create_app()"`` (or ``flask --app shop run`` while
developing); ``flask --app shop send-test-event --count 3`` checks that a deployment
reaches Klime.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import click
from flask import Flask

from klime.integrations.flask import get_client, init_app

from .views import bp


def create_app(config: Optional[Mapping[str, Any]] = None) -> Flask:
    app = Flask(__name__)
    # FLASK_KLIME_FLUSH_INTERVAL=500 in the environment becomes app.config["KLIME_FLUSH_INTERVAL"]
    # (values are parsed as JSON). KLIME_WRITE_KEY and KLIME_ENDPOINT are read by klime itself.
    app.config.from_prefixed_env()
    if config is not None:
        app.config.update(config)
    init_app(app)  # app.extensions["klime"]: a client made from the KLIME_* keys
    app.register_blueprint(bp)

    @app.cli.command("send-test-event")
    @click.option("--user-id", default="flask-test-user")
    @click.option("--count", default=1, type=int)
    @click.option("--timeout", default=10.0, type=float, help="seconds to wait for Klime")
    def send_test_event(user_id: str, count: int, timeout: float) -> None:
        """Track test events, flush them, and report what Klime accepted."""
        client = get_client()
        for n in range(count):
            client.track("Test Event", {"source": "send-test-event", "n": n}, user_id=user_id)
        result = client.flush(timeout=timeout)
        click.echo(f"sent {result.sent}, failed {result.failed}, unsent {result.unsent}")
        if not result.ok:
            raise click.ClickException("not every event reached Klime; see the klime log")

    return app
