"""Per-request context that follows a request through logs and gRPC hops."""

from __future__ import annotations

import contextvars
import uuid

REQUEST_ID_HEADER = "x-request-id"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    """Return a fresh request id (32 hex characters, like nginx's $request_id)."""
    return uuid.uuid4().hex


def current_request_id() -> str:
    """Return the request id of the running task, or "-" outside a request."""
    return request_id_var.get()
