from demoapp import views
from django.urls import path

urlpatterns = [
    path("hit/", views.hit),
    path("ping/", views.ping),
]
