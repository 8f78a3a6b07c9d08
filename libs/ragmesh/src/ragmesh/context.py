"""Per-request context that follows a request through logs and gRPC hops."""

from __future__ import annotations

import contextvars
import re
import uuid

REQUEST_ID_HEADER = "x-request-id"
# gRPC metadata carrying the service credential (see grpc_server.ContextInterceptor).
SERVICE_TOKEN_HEADER = "ragmesh-service-token"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    """Return a fresh request id (32 hex characters, like nginx's $request_id)."""
    return uuid.uuid4().hex


def current_request_id() -> str:
    """Return the request id of the running task, or "-" outside a request."""
    return request_id_var.get()


# What a request id from outside may look like; anything else (spaces, quotes,
# control characters that could forge log lines or headers) is replaced.
_ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def accept_request_id(value: object) -> str:
    """The caller's request id when it is a plain token (the gateway's rule), else a new one."""
    if isinstance(value, str) and _ACCEPTABLE_ID.fullmatch(value):
        return value
    return new_request_id()
