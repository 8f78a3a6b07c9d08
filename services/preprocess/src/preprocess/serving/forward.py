"""Forwarding: a /v1 request the mesh does not serve itself goes to the backend that owns it.

Inference picks the backend (the one serving the body's `model`, else the one
configured for the path), adds the server-side key and passes the body and
the answer through unchanged: JSON, server-sent events or binary, as they come.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson

from preprocess.clients import MeshClients
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import inference_pb2

_JSON = ("application/json", "text/json")


def model_of(body: bytes, content_type: str) -> str:
    """The `model` a JSON body names ("" for none, or a body that is not JSON)."""
    if not body or content_type.split(";")[0].strip().lower() not in _JSON:
        return ""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else ""


@dataclass
class Forwarded:
    """An upstream's answer: its status and headers, and its body as it comes."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


class ForwardServing:
    def __init__(self, clients: MeshClients, settings: PreprocessSettings) -> None:
        self._clients = clients
        self._settings = settings

    async def open(
        self, method: str, path: str, query: str, body: bytes, content_type: str, accept: str, model: str
    ) -> Forwarded:
        """Send the request on; errors before the upstream answered (no owner: 404) raise here."""
        call = self._clients.inference.Forward(
            inference_pb2.ForwardRequest(
                method=method,
                path=path,
                query=query,
                model=model,
                body=body,
                content_type=content_type,
                accept=accept,
            ),
            timeout=self._settings.request_timeout,
            metadata=call_metadata(),
        )
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        if not isinstance(first, inference_pb2.ForwardChunk):
            call.cancel()
            raise RagmeshError(ErrorKind.BAD_GATEWAY, "The upstream closed the connection without answering.")

        async def rest() -> AsyncIterator[bytes]:
            try:
                if first.data:
                    yield first.data
                while True:
                    chunk = await call.read()
                    if not isinstance(chunk, inference_pb2.ForwardChunk):
                        return
                    yield chunk.data
            except grpc.aio.AioRpcError:
                return  # the status and part of the body went out: the client sees a short body
            finally:
                call.cancel()

        return Forwarded(first.status, dict(first.headers), rest())

    async def json(self, path: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body to the backend owning `model` and return its JSON answer (an error status raises)."""
        forwarded = await self.open("POST", path, "", orjson.dumps(body), "application/json", "application/json", model)
        raw = b"".join([part async for part in forwarded.body])
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RagmeshError(
                ErrorKind.BAD_GATEWAY, f"The upstream of `{model}` answered something not JSON."
            ) from None
        if forwarded.status != 200:
            raise upstream_error(forwarded.status, answer, model)
        if not isinstance(answer, dict):
            raise RagmeshError(ErrorKind.BAD_GATEWAY, f"The upstream of `{model}` answered something not an object.")
        return answer


_KIND_BY_STATUS = {
    400: ErrorKind.INVALID_REQUEST,
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
    422: ErrorKind.INVALID_REQUEST,
    429: ErrorKind.RATE_LIMITED,
}


def upstream_error(status: int, answer: Any, model: str) -> RagmeshError:
    """An upstream's error answer as a domain error: a client mistake stays one, the rest is a 502."""
    error = answer.get("error", answer) if isinstance(answer, dict) else answer
    detail = error.get("message", error.get("detail", error)) if isinstance(error, dict) else error
    kind = _KIND_BY_STATUS.get(status, ErrorKind.BAD_GATEWAY)
    param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    return RagmeshError(kind, f"The upstream of `{model}` answered {status}: {str(detail)[:500]}", param=param)
