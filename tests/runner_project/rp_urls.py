from django.urls import path

from rp_app import views

urlpatterns = [path("notes/", views.notes)]
