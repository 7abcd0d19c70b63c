"""The test project's URLs with django-debug-toolbar's (tests/test_toolbar.py)."""

from django.urls import include, path

from testproject.urls import urlpatterns as project

urlpatterns = [*project, path("__debug__/", include("debug_toolbar.urls"))]
