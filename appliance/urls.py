from urllib.parse import quote, unquote

from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path, register_converter

from . import metrics
from .api import health, peer
from .console import chat, dashboard, security, usage_views


class RowName:
    """Match any team or variant name already in the database, so a link to one never fails to reverse.

    Names are validated (appliance.names) before they are stored; a row from before that,
    or written behind the registry's back, must still render its pages rather than a 500.
    Such a name is percent-encoded whole (dots too), so a browser cannot read "../x" as a
    path step; a valid name is its own URL. The views answer 404 for a name they do not know.
    """

    regex = r"[\s\S]*"

    def to_python(self, value: str) -> str:
        return unquote(value)

    def to_url(self, value: str) -> str:
        return quote(value, safe="").replace(".", "%2E")


register_converter(RowName, "rowname")
staff = admin.site.admin_view

urlpatterns = [
    # Console pages of our own, ahead of the admin's catch-all patterns.
    path("admin/", staff(dashboard.index), name="console-dashboard"),
    path("admin/login/", security.login, name="console-login"),
    path("admin/password_change/", staff(security.password_change), name="console-password-change"),
    path("admin/usage/", staff(usage_views.overview), name="console-usage"),
    path("admin/usage/team/<rowname:name>/", staff(usage_views.team_usage), name="console-usage-team"),
    path("admin/usage/variant/<rowname:name>/", staff(usage_views.variant_usage), name="console-usage-variant"),
    path("admin/usage/export.csv", staff(usage_views.export_csv), name="console-usage-csv"),
    path("admin/chat/", staff(chat.chat_page), name="console-chat"),
    path("admin/chat/key", staff(chat.chat_key), name="console-chat-key"),
    path("admin/", admin.site.urls),
    path("metrics", metrics.metrics, name="metrics"),
    path("health", health.health, name="health"),
    path("ready", health.ready, name="ready"),
    path("v1/", include("appliance.api.urls")),
    # Other nodes of the appliance reach this node's engines here (signed calls only: appliance.api.peer).
    path("node/v1/engines/<str:name>", peer.engine_facts, name="node-engine"),
    path("node/v1/engines/<str:name>/generate", peer.generate, name="node-engine-generate"),
    path("node/v1/variants/<str:name>/files/<path:rel>", peer.variant_file, name="node-variant-file"),
    # The console's CSS and scripts come from the apps' static folders: the box serves
    # itself, with no web server in front and nothing fetched from the internet.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]
