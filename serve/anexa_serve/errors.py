"""OpenAI-style errors: every refusal is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Handlers raise :class:`APIError`; the app turns it (and Starlette's own 404/405, and anything unexpected)
into that JSON body, so a client never sees a traceback or an HTML page.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` plus OpenAI's four error fields.

    ``type`` follows OpenAI's names (``invalid_request_error``, ``authentication_error``,
    ``rate_limit_error``, ``server_error``); ``param`` names the offending request field (dotted for
    nested ones, e.g. ``anexa.samplers``) or is None; ``code`` is a short machine-readable reason.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body, also used as an SSE ``data:`` event when a stream fails after it started."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """HTTP 400 ``invalid_request_error``: the most common refusal (``code`` ``invalid_value`` unless a more
    specific one is given)."""
    return APIError(400, message, param=param, code=code)
