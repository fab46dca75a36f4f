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


class GenerationFailed(RuntimeError):
    """A request's generation ended in an engine error chunk: a 503 when what ran it became unreachable, else 500."""

    def __init__(self, chunk):
        super().__init__(chunk.error)
        self.status = 503 if chunk.unavailable else 500

    @property
    def code(self) -> str:
        return "service_unavailable" if self.status == 503 else "server_error"

    def response(self) -> JsonResponse:
        return error(f"Generation failed: {self}", self.status, code=self.code)

    def payload(self) -> dict:
        """Return the error event that ends a stream (its 200 went out already)."""
        return error_payload(f"Generation failed: {self}", code=self.code)


def error_payload(message: str, *, code: str = "server_error") -> dict:
    """Return the error object sent inside a stream when a request fails after headers went out."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
