from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path

from .console import chat, dashboard, metrics, openapi, security, usage_views

staff = admin.site.admin_view

urlpatterns = [
    # Console pages of our own, ahead of the admin's catch-all patterns.
    path("admin/", staff(dashboard.index), name="console-dashboard"),
    path("admin/login/", security.login, name="console-login"),
    path("admin/password_change/", staff(security.password_change), name="console-password-change"),
    path("admin/usage/", staff(usage_views.overview), name="console-usage"),
    path("admin/usage/team/<slug:name>/", staff(usage_views.team_usage), name="console-usage-team"),
    path("admin/usage/variant/<slug:name>/", staff(usage_views.variant_usage), name="console-usage-variant"),
    path("admin/usage/export.csv", staff(usage_views.export_csv), name="console-usage-csv"),
    path("admin/chat/", staff(chat.chat_page), name="console-chat"),
    path("admin/chat/key", staff(chat.chat_key), name="console-chat-key"),
    path("admin/", admin.site.urls),
    path("metrics", metrics.metrics, name="metrics"),
    path("v1/openapi.json", openapi.openapi, name="v1-openapi"),
    path("v1/", include("inference.urls")),
    # The console's CSS and scripts come from the apps' static folders: the box serves
    # itself, with no web server in front and nothing fetched from the internet.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]
