from django.urls import path

from demoapp import views

urlpatterns = [
    path("hit/", views.hit),
    path("ping/", views.ping),
]
