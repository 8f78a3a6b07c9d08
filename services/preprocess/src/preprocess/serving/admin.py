"""The admin API: API keys, and the inference backends (reload).

Every call needs the admin key (RAGMESH_PREPROCESS_ADMIN_KEY) as a bearer
token; without one configured the admin API is off.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from preprocess.clients import MeshClients
from preprocess.keys import KeyStore
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import inference_pb2


class CreateKeyRequest(BaseModel):
    """POST /v1/admin/keys."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr = ""
    expires_in: StrictInt | None = Field(default=None, description="Seconds until the key expires; none: never.")
    models: list[StrictStr] | None = Field(default=None, description="Models the key may use; none: all.")
    rpm: StrictInt | None = Field(default=None, description="Requests per minute; none or 0: no limit.")
    tpm: StrictInt | None = Field(default=None, description="Tokens per minute; none or 0: no limit.")


def check_admin(authorization: str | None, admin_key: str) -> None:
    """The admin key as a bearer token, compared in constant time; 404 when the admin API is off."""
    if not admin_key:
        raise RagmeshError(ErrorKind.NOT_FOUND, "Admin endpoints are off (RAGMESH_PREPROCESS_ADMIN_KEY is not set).")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), admin_key.encode()):
        raise RagmeshError(ErrorKind.AUTHENTICATION, "A valid admin key is required.")


class AdminServing:
    def __init__(self, clients: MeshClients, keys: KeyStore) -> None:
        self._clients = clients
        self._keys = keys

    async def create_key(self, request: CreateKeyRequest) -> dict[str, Any]:
        """A new key: its secret is in this answer and nowhere else."""
        secret, key = await self._keys.create(
            request.name,
            expires_in=request.expires_in,
            models=list(request.models or []),
            rpm=request.rpm or 0,
            tpm=request.tpm or 0,
        )
        return {**key.public(), "key": secret}

    async def list_keys(self) -> dict[str, Any]:
        return {"object": "list", "data": [k.public() for k in await self._keys.list()]}

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        return (await self._keys.revoke(key_id)).public()

    async def reload_backends(self) -> dict[str, Any]:
        """Ask inference to read its backends file again (a bad file is refused, naming the line)."""
        try:
            reply = await self._clients.inference.ReloadBackends(
                inference_pb2.ReloadBackendsRequest(), timeout=60, metadata=call_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return {"object": "backends.reloaded", "backends": list(reply.backends), "models": list(reply.models)}
