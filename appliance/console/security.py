"""Console sign-in: throttling of failed attempts, and the forced password change of production mode."""
from django.conf import settings
from django.contrib import admin
from django.http import HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters

from .. import actions
from ..models import ConsolePassword


def client_address(request) -> str:
    """Return the peer address (the ASGI server's; a proxy in front must be trusted to set it)."""
    return request.META.get("REMOTE_ADDR", "")[:64]


@sensitive_post_parameters("password")
@csrf_protect
def login(request, **kwargs):
    """Sign in through the admin's own view, refusing without checking the password while locked out."""
    if request.method != "POST":
        return admin.site.login(request, **kwargs)
    username = request.POST.get("username", "")[:150]
    address = client_address(request)
    if actions.sign_in_locked_out(username, address):
        minutes = max(1, settings.CONSOLE_LOGIN_WINDOW_S // 60)
        return HttpResponse(f"Too many failed sign-ins. Try again in {minutes} minutes.",
                            status=429, content_type="text/plain", headers={"Retry-After": str(60 * minutes)})
    response = admin.site.login(request, **kwargs)
    if request.user.is_authenticated and response.status_code == 302:
        actions.do_clear_sign_in_failures(username)
        return response
    record_failure(username, address)
    return response


def record_failure(username: str, address: str) -> None:
    """Count a failed sign-in and record it in the ledger, never the password.

    Locked-out attempts are answered above without being recorded, so an address can add at most
    CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS events per window.
    """
    actions.do_record_sign_in_failure(username, address, shown=printable(username))


def printable(text: str, limit: int = 64) -> str:
    """Return text with unprintable characters escaped (\\x1b, \\n, …), cut to limit characters ("…" marks a cut)."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def password_change(request):
    """Change one's password through the admin's view and remember that the user chose it."""
    response = admin.site.password_change(request)
    if request.method == "POST" and response.status_code == 302:
        actions.do_record_password_change(request.user)
    return response


class PasswordChangeRequiredMiddleware:
    """In production mode, send staff whose password was never chosen in the console to change it first.

    The password `make run` prints, and any set from a shell, therefore works
    exactly once in production: to choose a new one.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if settings.APPLIANCE_PRODUCTION and self.must_change(request):
            allowed = {reverse("admin:password_change"), reverse("admin:password_change_done"),
                       reverse("admin:logout")}
            if request.path not in allowed:
                return redirect("admin:password_change")
        return self.get_response(request)

    @staticmethod
    def must_change(request) -> bool:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated or not user.is_staff:
            return False
        return not ConsolePassword.objects.filter(user=user).exists()
