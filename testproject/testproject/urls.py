from django.urls import path

from demoapp import async_views, views

urlpatterns = [
    path("hit/", views.hit),
    path("ping/", views.ping),
    path("ahit/", async_views.ahit),
    path("athread/", async_views.athread),
]
