import importlib.util
import os

from django.urls import path

from demoapp import async_views, views, worker_views

urlpatterns = [
    path("hit/", views.hit),
    path("ping/", views.ping),
    path("ahit/", async_views.ahit),
    path("athread/", async_views.athread),
    path("sleep/", worker_views.sleep),
]

# The pools' Prometheus metrics, for tests that scrape a multi-worker server
# (tests/test_deployment.py); prometheus_client is an optional extra.
if os.environ.get("DPP_METRICS_TOKEN") and importlib.util.find_spec("prometheus_client"):
    from django_pooled_pg.observability.prometheus import metrics_view

    urlpatterns.append(path("metrics/", metrics_view))
