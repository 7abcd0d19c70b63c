"""ASGI entry point with Django Channels (daphne): consumers beside Django's views.

``/channels/...`` goes to the consumers in demoapp.consumers; every other
HTTP path to Django's own ASGI application, as testproject.asgi serves it.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

django_application = get_asgi_application()  # sets Django up before the consumers import models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from demoapp.consumers import BumpConsumer, PoolConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter(
            [
                path("channels/bump/", BumpConsumer.as_asgi()),
                path("channels/pool/", PoolConsumer.as_asgi()),
                re_path(r"", django_application),
            ]
        )
    }
)
