from django.urls import path

from . import views

urlpatterns = [
    path("write/<str:key>", views.write),
    path("login", views.login),
    path("nested/<str:key>", views.nested),
    path("no-savepoint/<str:key>", views.atomic_no_savepoint),
    path("hooks/<str:key>", views.hooks),
    path("hook-without-query/<str:key>", views.hook_without_query),
    path("deferred/<str:key>", views.deferred),
    path("refused/<str:key>", views.refused),
    path("session/<str:key>", views.session),
    path("wait/<str:key>", views.wait),
    path("spawn/<str:key>", views.spawn),
    path("orm-async/<str:key>", views.orm_async),
    path("async/<str:key>", views.async_view),
    path("stream/<str:key>", views.stream),
    path("stream-items/<str:key>", views.stream_items),
    path("aliases/<str:key>", views.aliases),
    path("count/<str:key>", views.count),
    path("reenter/<str:key>", views.reenter),
    path("tagged/<str:key>", views.tagged),
]
