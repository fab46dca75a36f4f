"""The staff chat page: it talks to /v1/chat/completions like any team, with a short-lived console key."""
from django.conf import settings
from django.contrib import admin
from django.http import HttpResponseNotAllowed, JsonResponse
from django.shortcuts import render

from .. import actions
from ..models import ModelVariant, VariantStatus


def chat_page(request):
    """Render the chat page with the variants that can be chosen."""
    variants = ModelVariant.objects.filter(status__in=[VariantStatus.READY, VariantStatus.DEPLOYED]) \
        .select_related("deployment").order_by("name")
    choices = [{"name": v.name, "loaded": getattr(getattr(v, "deployment", None), "actual", "") == "deployed",
                "random_weights": v.random_weights} for v in variants]
    return render(request, "console/chat.html", {**admin.site.each_context(request), "title": "Chat with a model",
                                                 "choices": choices})


def chat_key(request):
    """Issue the signed-in user's console key (stored hashed, expiring) and return its plaintext once."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    key, plaintext = actions.do_issue_console_key(request.user.get_username(),
                                                  ttl_s=settings.CONSOLE_CHAT_KEY_TTL_S)
    response = JsonResponse({"key": plaintext, "prefix": key.prefix, "team": key.team.name,
                             "expires_at": key.expires_at.isoformat()})
    response["Cache-Control"] = "no-store"
    return response
