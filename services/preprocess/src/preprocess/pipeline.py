"""One request's trip through the mesh: inference.Generate -> postprocess.Process.

Generation chunks are forwarded to postprocess as they arrive; postprocess's
output goes to the client. Closing the pipeline (client gone, deadline, stop
sequence) cancels both calls, which frees the engine slot.

A non-streamed request whose first chunk already finishes its one choice (an
upstream asked for the whole answer, a fixed answer, a one-token generation) goes
to postprocess as one unary ProcessWhole call: the same session and checks, without
a bidi stream's messages and tasks. Any other non-streamed request opens Process
once that first chunk is in, and goes on as a stream does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Protocol

import grpc

from preprocess.clients import MeshClients
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2

log = logging.getLogger(__name__)


class Answer(Protocol):
    """Client-ready output of one request, from a generation or from the cache."""

    # Set once the answer is complete: what it cost, for per-key token limits.
    usage: common_pb2.Usage | None

    def responses(self) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]: ...

    async def collect(self) -> str: ...

    def close(self) -> None:
        """Cancel whatever is still running (a no-op once finished)."""


class GenerationPipeline:
    def __init__(
        self,
        clients: MeshClients,
        generate: inference_pb2.GenerateRequest,
        start: postprocess_pb2.ProcessStart,
        timeout: float,
        fixed: common_pb2.GenerationChunk | None = None,
    ) -> None:
        """`fixed`: an answer known without the model (the whole generation, one chunk)."""
        self._fixed = fixed
        self._clients = clients
        self._generate = generate
        self._start = start
        self._timeout = timeout
        self._gen: grpc.aio.UnaryStreamCall[inference_pb2.GenerateRequest, common_pb2.GenerationChunk] | None = None
        self._proc: (
            grpc.aio.StreamStreamCall[postprocess_pb2.ProcessRequest, postprocess_pb2.ProcessResponse] | None
        ) = None
        self._first: common_pb2.GenerationChunk | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        # A non-streamed request's Process call is opened after the first chunk; its start is still to send.
        self._start_pending = False
        self._gen_error: RagmeshError | None = None
        self.usage: common_pb2.Usage | None = None

    async def open(self) -> None:
        """Start generation and wait until the engine accepted the prompt.

        Errors the engine raises up front (prompt over the context, unknown model,
        overload) surface here, before any byte of a streamed response is sent.
        """
        metadata = self._metadata = call_metadata()
        if self._start.stream:
            self._proc = self._clients.postprocess.Process(timeout=self._timeout, metadata=metadata)
        if self._fixed is None:
            self._gen = self._clients.inference.Generate(self._generate, timeout=self._timeout, metadata=metadata)
        try:
            if self._proc is not None:
                # Postprocess gets the start while the engine works on the prompt, not after.
                await self._proc.write(postprocess_pb2.ProcessRequest(start=self._start))
            first = self._fixed if self._gen is None else await self._gen.read()
        except grpc.aio.AioRpcError as exc:
            self.close()
            raise from_rpc_error(exc) from None
        except BaseException:
            self.close()
            raise
        if not isinstance(first, common_pb2.GenerationChunk):  # EOF
            self.close()
            raise RagmeshError(ErrorKind.INTERNAL, "inference ended without output")
        self._first = first

    def close(self) -> None:
        """Cancel whatever is still running (a no-op for finished calls)."""
        for call in (self._gen, self._proc):
            if call is not None:
                call.cancel()

    async def _pump(self) -> None:
        """Forward generation chunks to postprocess until generation ends. Whatever fails here
        ends the answer at once: the reader is never left waiting for the deadline."""
        assert self._proc is not None and self._first is not None
        try:
            if self._start_pending:
                self._start_pending = False
                await self._proc.write(postprocess_pb2.ProcessRequest(start=self._start))
            chunk: object = self._first
            while chunk is not grpc.aio.EOF:
                assert isinstance(chunk, common_pb2.GenerationChunk)
                await self._proc.write(postprocess_pb2.ProcessRequest(chunk=chunk))
                if self._gen is None:  # a fixed answer: that was all of it
                    break
                try:
                    chunk = await self._gen.read()
                except grpc.aio.AioRpcError as exc:
                    # Inference failed mid-stream. Half-closing tells postprocess the
                    # generation ended unfinished; the reader reports this error.
                    self._gen_error = from_rpc_error(exc)
                    break
            await self._proc.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # Postprocess failed or already ended the call (grpc.aio refuses writes to a finished
            # call with InvalidStateError): the reader gets the call's status, a 503 when the
            # server went away, not a 500 of ours.
            pass
        except Exception as exc:
            log.exception("forwarding the generation to postprocess failed")
            self._gen_error = RagmeshError(
                ErrorKind.INTERNAL, f"forwarding the generation failed: {type(exc).__name__}"
            )
            if self._gen is not None:
                self._gen.cancel()  # the engine frees the slot
            try:
                # As when inference fails: postprocess learns the generation ended unfinished,
                # and the reader reports this error.
                await self._proc.done_writing()
            except Exception:  # noqa: BLE001 - then postprocess goes too; the reader still raises this error
                self._proc.cancel()

    def _whole(self) -> bool:
        """Whether the first chunk is the whole answer: a non-streamed request's one choice, finished."""
        assert self._first is not None
        return (
            not self._start.stream
            and self._start.n <= 1
            and self._first.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        )

    async def _process_whole(self) -> postprocess_pb2.ProcessResponse:
        """The answer from one unary ProcessWhole call (see the module docstring)."""
        assert self._first is not None
        request = postprocess_pb2.ProcessWholeRequest(start=self._start, chunks=[self._first])
        try:
            response = await self._clients.postprocess.ProcessWhole(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            self.close()  # the generation is over (its one choice finished): nothing more to read
        self.usage = response.usage
        return response

    async def responses(self) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        """Client-ready output, in order, until every choice finished."""
        if self._proc is None:  # non-streamed: postprocess is called once the first chunk is in
            if self._whole():
                yield await self._process_whole()
                return
            # The pump writes the start first: a call that fails then is reported as any write's failure.
            self._proc = self._clients.postprocess.Process(timeout=self._timeout, metadata=self._metadata)
            self._start_pending = True
        pump = asyncio.create_task(self._pump())
        # Once the answer is complete the pump is cancelled mid-write; its outcome is moot.
        pump.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            while True:
                try:
                    response = await self._proc.read()
                except grpc.aio.AioRpcError as exc:
                    raise (self._gen_error or from_rpc_error(exc)) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._gen_error is None or (task is not None and task.cancelling()):
                        raise
                    raise self._gen_error from None  # the pump cancelled the call, not our caller
                if response is grpc.aio.EOF:
                    if self._gen_error is not None:
                        raise self._gen_error
                    raise RagmeshError(ErrorKind.INTERNAL, "postprocess ended without finishing the answer")
                assert isinstance(response, postprocess_pb2.ProcessResponse)
                if response.generation_done:
                    self.usage = response.usage
                yield response
                if response.generation_done:
                    return
        finally:
            pump.cancel()
            self.close()

    async def collect(self) -> str:
        """The whole (non-streamed) response body."""
        async for response in self.responses():
            if response.response_json:
                return response.response_json
        raise RagmeshError(ErrorKind.INTERNAL, "postprocess returned no response")


class CachedAnswer:
    """An answer replayed from the response cache by postprocess (same output shapes)."""

    def __init__(self, clients: MeshClients, start: postprocess_pb2.ProcessStart, timeout: float) -> None:
        self._clients = clients
        self._start = start
        self._timeout = timeout
        self._call: grpc.aio.UnaryStreamCall[postprocess_pb2.ProcessStart, postprocess_pb2.ProcessResponse] | None = (
            None
        )
        self._first: postprocess_pb2.ProcessResponse | None = None
        self.usage: common_pb2.Usage | None = None

    async def open(self) -> bool:
        """Whether the cache has the answer. Any trouble with the cache counts as a miss."""
        self._call = self._clients.postprocess.Replay(self._start, timeout=self._timeout, metadata=call_metadata())
        try:
            first = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("response cache lookup failed", extra={"error": exc.details()})
            return False
        if not isinstance(first, postprocess_pb2.ProcessResponse):
            return False
        self._first = first
        return True

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def responses(self) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        assert self._call is not None and self._first is not None
        try:
            response: object = self._first
            while isinstance(response, postprocess_pb2.ProcessResponse):
                if response.generation_done:
                    self.usage = response.usage
                yield response
                response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            self._call.cancel()

    async def collect(self) -> str:
        async for response in self.responses():
            if response.response_json:
                return response.response_json
        raise RagmeshError(ErrorKind.INTERNAL, "the cached answer was empty")
