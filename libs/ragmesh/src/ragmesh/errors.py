"""The error table: one place maps a domain error to gRPC status, HTTP status and OpenAI body.

Services raise `RagmeshError` (or a subclass). The gRPC server helper turns it
into a status with trailing metadata; the gRPC client helper turns that back
into the same `RagmeshError`; preprocess renders it as an OpenAI error body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc
import redis.exceptions

from ragmesh.context import current_request_id


class ErrorKind(enum.Enum):
    """Domain error kinds. The value is what travels in gRPC trailing metadata."""

    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    BAD_GATEWAY = "bad_gateway"
    DEADLINE = "deadline"
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorRow:
    grpc_status: grpc.StatusCode
    http_status: int
    openai_type: str
    default_code: str | None


ERROR_TABLE: dict[ErrorKind, ErrorRow] = {
    ErrorKind.INVALID_REQUEST: ErrorRow(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", None),
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: ErrorRow(
        grpc.StatusCode.INVALID_ARGUMENT, 415, "invalid_request_error", "unsupported_media_type"
    ),
    ErrorKind.AUTHENTICATION: ErrorRow(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error", "invalid_api_key"),
    ErrorKind.PERMISSION: ErrorRow(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error", None),
    # OpenAI answers an unknown model with type invalid_request_error and a code.
    ErrorKind.NOT_FOUND: ErrorRow(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "not_found"),
    ErrorKind.CONFLICT: ErrorRow(grpc.StatusCode.ALREADY_EXISTS, 409, "invalid_request_error", "conflict"),
    ErrorKind.PAYLOAD_TOO_LARGE: ErrorRow(
        grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error", "payload_too_large"
    ),
    ErrorKind.RATE_LIMITED: ErrorRow(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "rate_limit_exceeded"
    ),
    # 499 is nginx's "client closed request": nobody reads it, but logs and metrics do.
    ErrorKind.CANCELLED: ErrorRow(grpc.StatusCode.CANCELLED, 499, "cancelled", "cancelled"),
    ErrorKind.UNAVAILABLE: ErrorRow(grpc.StatusCode.UNAVAILABLE, 503, "server_error", "service_unavailable"),
    # An upstream engine answered something unusable (error status, non-JSON, wrong shape).
    ErrorKind.BAD_GATEWAY: ErrorRow(grpc.StatusCode.INTERNAL, 502, "server_error", "bad_gateway"),
    ErrorKind.DEADLINE: ErrorRow(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "timeout"),
    ErrorKind.INTERNAL: ErrorRow(grpc.StatusCode.INTERNAL, 500, "server_error", "internal_error"),
}

# A status that arrives without ragmesh metadata (a transport failure, another
# server) is read with this table.
_KIND_BY_GRPC_STATUS: dict[grpc.StatusCode, ErrorKind] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: ErrorKind.INVALID_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.INVALID_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: ErrorKind.AUTHENTICATION,
    grpc.StatusCode.PERMISSION_DENIED: ErrorKind.PERMISSION,
    grpc.StatusCode.NOT_FOUND: ErrorKind.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: ErrorKind.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.RATE_LIMITED,
    grpc.StatusCode.CANCELLED: ErrorKind.CANCELLED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE,
    grpc.StatusCode.UNIMPLEMENTED: ErrorKind.UNAVAILABLE,
}

_MD_KIND = "ragmesh-error-kind"
_MD_PARAM = "ragmesh-error-param"
_MD_CODE = "ragmesh-error-code"
_MD_RETRY_AFTER = "ragmesh-retry-after"


class RagmeshError(Exception):
    """A domain error with everything needed to render it at any layer."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code if code is not None else ERROR_TABLE[kind].default_code
        self.retry_after = retry_after
        # Extra HTTP headers the error's response carries (x-ratelimit-*, say).
        self.headers = headers or {}

    @property
    def row(self) -> ErrorRow:
        return ERROR_TABLE[self.kind]

    @property
    def http_status(self) -> int:
        return self.row.http_status

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {"message", "type", "param", "code", "request_id"}}."""
        return openai_error_body(self.message, self.row.openai_type, self.param, self.code)

    def grpc_trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        md = [(_MD_KIND, self.kind.value)]
        if self.param is not None:
            md.append((_MD_PARAM, self.param))
        if self.code is not None:
            md.append((_MD_CODE, self.code))
        if self.retry_after is not None:
            md.append((_MD_RETRY_AFTER, str(self.retry_after)))
        return tuple(md)

    def __repr__(self) -> str:
        return f"RagmeshError({self.kind.value}, {self.message!r}, param={self.param!r})"


def openai_error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Build the OpenAI error envelope, with the request id when there is one (a client can quote it)."""
    error: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    request_id = current_request_id()
    if request_id != "-":
        error["request_id"] = request_id
    return {"error": error}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> RagmeshError:
    """Shorthand for the most common error: a 400 naming the offending parameter."""
    return RagmeshError(ErrorKind.INVALID_REQUEST, message, param=param, code=code)


# Redis away, slow, loading its data, read-only (a replica after a failover), out of memory, a
# cluster moving slots: a dependency that cannot answer now, never the request's fault.
REDIS_UNAVAILABLE_ERRORS: tuple[type[redis.exceptions.RedisError], ...] = (
    redis.exceptions.ConnectionError,  # refused, reset, its password refused; BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def store_unavailable() -> RagmeshError:
    """What a client sees when Redis fails: 503, retry shortly (the message never carries
    Redis's own text, which may name hosts)."""
    return RagmeshError(
        ErrorKind.UNAVAILABLE,
        "The state store (Redis) is unavailable; retry shortly.",
        code="service_unavailable",
        retry_after=2,
    )


def from_exception(exc: BaseException) -> RagmeshError:
    """The table's reading of any exception: a RagmeshError as it is; any Redis error a 503
    (UNAVAILABLE: a dependency down, whether it is away, slow or refusing, so a client or a
    queue retries rather than reporting a server bug); anything else INTERNAL (500)."""
    if isinstance(exc, RagmeshError):
        return exc
    if isinstance(exc, redis.exceptions.RedisError):
        return store_unavailable()
    return RagmeshError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}")


def from_grpc(
    status: grpc.StatusCode | None,
    details: str | None,
    trailing_metadata: Any,
) -> RagmeshError:
    """Rebuild the domain error a ragmesh server sent (or classify a foreign status)."""
    md = {k: v for k, v in (trailing_metadata or ()) if isinstance(v, str)}
    kind_value = md.get(_MD_KIND)
    kind: ErrorKind
    if kind_value is not None and kind_value in ErrorKind._value2member_map_:
        kind = ErrorKind(kind_value)
    else:
        kind = _KIND_BY_GRPC_STATUS.get(status or grpc.StatusCode.UNKNOWN, ErrorKind.INTERNAL)
    retry_after = md.get(_MD_RETRY_AFTER)
    message = details or (status.name if status else "unknown error")
    return RagmeshError(
        kind,
        message,
        param=md.get(_MD_PARAM),
        code=md.get(_MD_CODE),
        retry_after=int(retry_after) if retry_after and retry_after.isdigit() else None,
    )


def from_rpc_error(exc: grpc.aio.AioRpcError) -> RagmeshError:
    """Rebuild the domain error carried by a failed gRPC call."""
    return from_grpc(exc.code(), exc.details(), exc.trailing_metadata())
