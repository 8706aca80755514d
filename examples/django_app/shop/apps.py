from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings

import klime


class ShopConfig(AppConfig):
    name = "shop"

    def ready(self) -> None:
        # Runs once per process when Django starts (runserver, gunicorn's master with
        # --preload, each worker otherwise, manage.py commands, the test runner). Creating the
        # client is cheap: no thread and no connection until the first event, so a preforking
        # server's master never forks with a live klime thread. A missing write key fails
        # here, at start-up, with klime.ConfigurationError.
        if klime.client is None:
            klime.client = klime.Client(settings.KLIME_WRITE_KEY, endpoint=settings.KLIME_ENDPOINT)
