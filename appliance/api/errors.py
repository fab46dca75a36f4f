"""Errors in OpenAI's JSON shape, so the official clients raise the right exception."""
from django.http import JsonResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


def error(message: str, status: int, *, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JsonResponse:
    """Return an OpenAI-shaped error response."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JsonResponse(body, status=status, headers=headers)


def error_payload(message: str, *, code: str = "server_error") -> dict:
    """Return the error object sent inside a stream when a request fails after headers went out."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
