"""The Retrieval gRPC servicer. The contract is drafted; search lands with the retrieval issue."""

from __future__ import annotations

import grpc

from ragmesh.grpc_server import ServicerContext
from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    async def Search(  # noqa: N802 - gRPC method name
        self, request: retrieval_pb2.SearchRequest, context: ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "search is not implemented yet")
        raise AssertionError("unreachable")

    async def Embed(  # noqa: N802
        self, request: retrieval_pb2.EmbedRequest, context: ServicerContext
    ) -> retrieval_pb2.EmbedResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "embeddings are not implemented yet")
        raise AssertionError("unreachable")
