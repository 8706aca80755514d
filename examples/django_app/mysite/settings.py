"""Settings of the klime Django example: the smallest project that runs (no database).

klime's part is the two ``KLIME_*`` settings at the end, read from the environment; the
``shop`` app builds the client from them when Django starts (``shop/apps.py``).
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = ["shop"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# klime: the write key of your Klime workspace and, for the local collector or a proxy, the
# endpoint (None: https://i.klime.com). Keep the key out of the source: read it from the
# environment or your secrets manager.
KLIME_WRITE_KEY = os.environ.get("KLIME_WRITE_KEY")
KLIME_ENDPOINT = os.environ.get("KLIME_ENDPOINT")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"klime": {"handlers": ["console"], "level": "WARNING"}},
}
