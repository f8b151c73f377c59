"""The server's door: the API key and the body-size bound, checked before any handler runs.

A plain ASGI middleware rather than FastAPI's `@app.middleware("http")`: that one wraps every response
in a second stream and hides the client's disconnect from the handlers, which need it to free rows.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from fucina.serve.protocol import APIError

# Answered without the API key: the health probe, and the web page with its static files, which hold
# no data (the page asks for the key and sends it with every API call; a browser cannot send a bearer
# header when it loads a page).
OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = ("/static/",)


class Guard:
    """401 without `Authorization: Bearer <api_key>` (but on the open paths); 413 for large bodies."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.expected is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return APIError(
                    401, "invalid or missing API key", code="invalid_api_key", kind="authentication_error"
                )
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
            return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes")
        return None
