"""The error table round-trips through gRPC metadata and renders OpenAI bodies."""

from __future__ import annotations

import grpc
import pytest

from ragmesh.errors import ERROR_TABLE, ErrorKind, RagmeshError, from_grpc


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_every_kind_round_trips_through_grpc_metadata(kind: ErrorKind) -> None:
    err = RagmeshError(kind, "boom", param="messages", code="c1", retry_after=3)
    back = from_grpc(err.row.grpc_status, err.message, err.grpc_trailing_metadata())
    assert (back.kind, back.message, back.param, back.code, back.retry_after) == (kind, "boom", "messages", "c1", 3)


def test_openai_body_shape() -> None:
    body = RagmeshError(ErrorKind.NOT_FOUND, "no such model", param="model").to_openai()
    assert body == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "not_found"}
    }


def test_foreign_status_without_metadata_is_classified() -> None:
    err = from_grpc(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    assert err.kind is ErrorKind.UNAVAILABLE and err.http_status == 503
    assert from_grpc(grpc.StatusCode.DEADLINE_EXCEEDED, None, ()).http_status == 504
    assert from_grpc(grpc.StatusCode.UNKNOWN, "x", ()).http_status == 500


def test_no_kind_maps_to_422() -> None:
    assert all(row.http_status != 422 for row in ERROR_TABLE.values())
