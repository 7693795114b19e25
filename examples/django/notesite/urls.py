from django.urls import path
from notes import views

urlpatterns = [
    path("notes/", views.notes),
    path("notes/failing", views.create_then_fail),
    path("notes/batch", views.batch),
    path("notes/export.csv", views.export),
]
