"""The admin API: API keys, and the inference backends (reload, keys at run time, state).

It is served on the admin listener only (RAGMESH_PREPROCESS_ADMIN_PORT, behind
the gateway's internal admin port), never on the public one. Every call needs
the admin key (RAGMESH_PREPROCESS_ADMIN_KEY) as a bearer token; without one
configured the admin API is off. Every action writes one audit line (logger
`ragmesh.audit`: action, target, outcome, request id); a key, whether an API
key's secret or a backend's, is never in it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from preprocess.clients import MeshClients
from preprocess.keys import KeyStore
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import inference_pb2

audit = logging.getLogger("ragmesh.audit")


class SetBackendKeyRequest(BaseModel):
    """PUT /v1/admin/backends/{name}/key."""

    model_config = ConfigDict(extra="forbid")

    api_key: StrictStr = Field(min_length=1, description="Used from the next request on; never shown again.")


def backend_object(info: inference_pb2.BackendInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "object": "backend",
        "type": info.type,
        "base_url": info.base_url,
        "circuit": info.circuit,
        "in_flight": info.in_flight,
        "last_error": info.last_error or None,
        "last_error_at": info.last_error_at or None,
        "key_source": info.key_source,
        "models": list(info.models),
        "paths": list(info.paths),
    }


class CreateKeyRequest(BaseModel):
    """POST /v1/admin/keys."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr = ""
    expires_in: StrictInt | None = Field(default=None, description="Seconds until the key expires; none: never.")
    models: list[StrictStr] | None = Field(default=None, description="Models the key may use; none: all.")
    rpm: StrictInt | None = Field(default=None, description="Requests per minute; none or 0: no limit.")
    tpm: StrictInt | None = Field(default=None, description="Tokens per minute; none or 0: no limit.")
    max_in_flight: StrictInt | None = Field(
        default=None,
        description="Requests at once; none or 0: the server's default (RAGMESH_PREPROCESS_KEY_MAX_IN_FLIGHT).",
    )


def check_admin(authorization: str | None, admin_key: str) -> None:
    """The admin key as a bearer token, compared in constant time; 404 when the admin API is off."""
    if not admin_key:
        raise RagmeshError(ErrorKind.NOT_FOUND, "Admin endpoints are off (RAGMESH_PREPROCESS_ADMIN_KEY is not set).")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), admin_key.encode()):
        raise RagmeshError(ErrorKind.AUTHENTICATION, "A valid admin key is required.")


@asynccontextmanager
async def audited(action: str, target: str = "") -> AsyncIterator[None]:
    """One audit line for the action: its outcome, "ok" or the error kind."""
    try:
        yield
    except RagmeshError as err:
        audit.info("admin action", extra={"action": action, "target": target, "outcome": err.kind.value})
        raise
    except BaseException:
        audit.info("admin action", extra={"action": action, "target": target, "outcome": "error"})
        raise
    audit.info("admin action", extra={"action": action, "target": target, "outcome": "ok"})


class AdminServing:
    def __init__(self, clients: MeshClients, keys: KeyStore) -> None:
        self._clients = clients
        self._keys = keys

    async def _inference(self, method: Any, request: Any, deadline: float = 30) -> Any:
        try:
            return await method(request, timeout=deadline, metadata=call_metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def create_key(self, request: CreateKeyRequest) -> dict[str, Any]:
        """A new key: its secret is in this answer and nowhere else."""
        async with audited("api_key.create", request.name):
            secret, key = await self._keys.create(
                request.name,
                expires_in=request.expires_in,
                models=list(request.models or []),
                rpm=request.rpm or 0,
                tpm=request.tpm or 0,
                max_in_flight=request.max_in_flight or 0,
            )
        return {**key.public(), "key": secret}

    async def list_keys(self) -> dict[str, Any]:
        async with audited("api_key.list"):
            return {"object": "list", "data": [k.public() for k in await self._keys.list()]}

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        async with audited("api_key.revoke", key_id):
            return (await self._keys.revoke(key_id)).public()

    async def reload_backends(self) -> dict[str, Any]:
        """Ask inference to read its backends file again (a bad file is refused, naming the line)."""
        async with audited("backends.reload"):
            reply = await self._inference(
                self._clients.inference.ReloadBackends, inference_pb2.ReloadBackendsRequest(), deadline=60
            )
        return {"object": "backends.reloaded", "backends": list(reply.backends), "models": list(reply.models)}

    async def list_backends(self) -> dict[str, Any]:
        """Every backend: circuit, requests in flight, last error, where its key comes from (never the key)."""
        async with audited("backends.list"):
            reply = await self._inference(self._clients.inference.ListBackends, inference_pb2.ListBackendsRequest())
        return {"object": "list", "data": [backend_object(b) for b in reply.backends]}

    async def set_backend_key(self, backend: str, request: SetBackendKeyRequest) -> dict[str, Any]:
        """Use this key for `backend` from its next request on (until reverted or inference restarts)."""
        async with audited("backend.key.set", backend):
            info = await self._inference(
                self._clients.inference.SetBackendKey,
                inference_pb2.SetBackendKeyRequest(backend=backend, api_key=request.api_key),
            )
        return backend_object(info)

    async def revert_backend_key(self, backend: str) -> dict[str, Any]:
        """Back to the key the backends file names (api_key_env or api_key_file)."""
        async with audited("backend.key.revert", backend):
            info = await self._inference(
                self._clients.inference.RevertBackendKey, inference_pb2.RevertBackendKeyRequest(backend=backend)
            )
        return backend_object(info)
