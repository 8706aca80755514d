"""ASGI entry point: ``uvicorn mysite.asgi:application``.

Django's ASGI handler does not speak the ASGI lifespan protocol; ``klime.asgi_lifespan``
answers it and flushes the default client, off the event loop, when the server shuts down.
"""

import os

from django.core.asgi import get_asgi_application

import klime

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = klime.asgi_lifespan(get_asgi_application())
