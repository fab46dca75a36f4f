"""Console sign-in: throttling of failed attempts, and the forced password change of production mode."""
from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.db import transaction
from django.http import HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters

from audit import ledger

from ..models import ConsolePassword, LoginFailure


def client_address(request) -> str:
    """Return the peer address (the ASGI server's; a proxy in front must be trusted to set it)."""
    return request.META.get("REMOTE_ADDR", "")[:64]


def locked_out(username: str, address: str) -> bool:
    """Return whether recent failures for this user name or address exceed the limits."""
    since = timezone.now() - timedelta(seconds=settings.CONSOLE_LOGIN_WINDOW_S)
    recent = LoginFailure.objects.filter(created_at__gte=since)
    return (recent.filter(username=username).count() >= settings.CONSOLE_LOGIN_MAX_FAILURES
            or recent.filter(address=address).count() >= settings.CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS)


@sensitive_post_parameters("password")
@csrf_protect
def login(request, **kwargs):
    """Sign in through the admin's own view, refusing without checking the password while locked out."""
    if request.method != "POST":
        return admin.site.login(request, **kwargs)
    username = request.POST.get("username", "")[:150]
    address = client_address(request)
    if locked_out(username, address):
        minutes = max(1, settings.CONSOLE_LOGIN_WINDOW_S // 60)
        return HttpResponse(f"Too many failed sign-ins. Try again in {minutes} minutes.",
                            status=429, content_type="text/plain", headers={"Retry-After": str(60 * minutes)})
    response = admin.site.login(request, **kwargs)
    if request.user.is_authenticated and response.status_code == 302:
        LoginFailure.objects.filter(username=username).delete()
        return response
    record_failure(username, address)
    return response


def record_failure(username: str, address: str) -> None:
    """Count a failed sign-in and record it in the ledger (and the lockout it causes), never the password.

    Locked-out attempts are answered above without being recorded, so an address can add at most
    CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS events per window.
    """
    shown = printable(username)
    with transaction.atomic():
        LoginFailure.objects.create(username=username, address=address)
        ledger.append("console.sign_in_failed", actor=f"sign-in:{shown}", target=shown, outcome="denied",
                      details={"address": address, "username_length": len(username)})
        if locked_out(username, address):
            ledger.append("console.lockout", actor="anonymous", target=shown, outcome="denied",
                          details={"address": address, "window_s": settings.CONSOLE_LOGIN_WINDOW_S})


def printable(text: str, limit: int = 64) -> str:
    """Return text with unprintable characters escaped (\\x1b, \\n, …), cut to limit characters ("…" marks a cut)."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def password_change(request):
    """Change one's password through the admin's view and remember that the user chose it."""
    response = admin.site.password_change(request)
    if request.method == "POST" and response.status_code == 302:
        ConsolePassword.objects.update_or_create(user=request.user, defaults={"changed_at": timezone.now()})
        ledger.append("console.password_change", actor=f"admin:{request.user.get_username()}",
                      target=request.user.get_username())
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
