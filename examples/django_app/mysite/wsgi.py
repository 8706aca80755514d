"""WSGI entry point: ``gunicorn mysite.wsgi`` (``--preload`` is fine).

klime needs nothing here: each worker sends from its own background thread, started on its
first event, and flushes at exit (gunicorn's SIGTERM, ``--max-requests`` recycling).
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = get_wsgi_application()
