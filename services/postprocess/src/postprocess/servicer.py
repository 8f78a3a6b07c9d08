"""The Postprocess gRPC servicer: drives a ProcessSession over the bidi stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from postprocess.session import ProcessSession
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.grpc_server import ServicerContext
from ragmesh.v1 import postprocess_pb2, postprocess_pb2_grpc


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServicer):
    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[postprocess_pb2.ProcessRequest],
        context: ServicerContext,
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "start":
            raise invalid_request("the first Process message must be a ProcessStart")
        session = ProcessSession(first.start)
        async for message in request_iterator:
            if message.WhichOneof("msg") != "chunk":
                raise invalid_request("only one ProcessStart is allowed per call")
            for response in session.feed(message.chunk):
                yield response
            if session.done:
                return
        if not session.done:
            raise RagmeshError(ErrorKind.INTERNAL, "generation ended before every choice finished")
