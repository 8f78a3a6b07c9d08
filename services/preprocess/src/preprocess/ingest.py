"""Accepting documents: validate, clean, chunk, record the job, publish it (confirmed).

202 is answered only after RabbitMQ confirmed the job, so an accepted job is
never lost; if the broker is down the client gets 503 and nothing was queued.
A job is one message, so a collection never ends up half-ingested: retrieval
indexes a job's chunks together or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
from aiormq.exceptions import AMQPError
from google.protobuf.struct_pb2 import Struct
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from redis.exceptions import RedisError

from preprocess.documents import Chunker, clean_text
from preprocess.protocol import validation_error
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import Topology, declare_ingest, persistent_message
from ragmesh.amqp_client import LazyChannel
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.jobs import JobStore
from ragmesh.v1 import ingest_pb2

log = logging.getLogger(__name__)


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(min_length=1, max_length=256)
    text: StrictStr
    title: StrictStr = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn]


@dataclass(frozen=True)
class Accepted:
    job_id: str
    documents: int
    chunks: int


def parse_documents(body: Any, settings: PreprocessSettings) -> DocumentsRequest:
    """Validate the whole request before anything is queued (400/413 name the problem)."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object with a 'documents' list.")
    documents = body.get("documents")
    if isinstance(documents, list) and len(documents) > settings.max_documents_per_request:
        raise RagmeshError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"At most {settings.max_documents_per_request} documents per request (got {len(documents)}); "
            "split them over several requests.",
            param="documents",
            code="too_many_documents",
        )
    try:
        request = DocumentsRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if not request.documents:
        raise invalid_request("'documents' must not be empty.", param="documents")
    seen: set[str] = set()
    for i, doc in enumerate(request.documents):
        if doc.id in seen:
            raise invalid_request(f"Document id '{doc.id}' appears twice in this request.", param=f"documents[{i}].id")
        seen.add(doc.id)
        if len(doc.text) > settings.max_document_chars:
            raise invalid_request(
                f"documents[{i}].text is {len(doc.text)} characters; the limit is {settings.max_document_chars}.",
                param=f"documents[{i}].text",
            )
    return request


class IngestPublisher:
    """Turns accepted documents into one IngestJob on the durable `ingest` queue."""

    def __init__(self, settings: PreprocessSettings, chunker: Chunker, jobs: JobStore) -> None:
        self._settings = settings
        self._chunker = chunker
        self._jobs = jobs
        self._topology = Topology(settings.namespace)
        self._channel = LazyChannel(
            settings.amqp_url,
            name=f"{settings.namespace or 'ragmesh'}.preprocess.ingest",
            declare=lambda channel: declare_ingest(channel, self._topology),
            on_return_raises=True,
        )

    async def check(self) -> str:
        """Readiness: "ok" once the broker answered (connecting on first use)."""
        return await self._channel.check(self._settings.publish_timeout)

    async def close(self) -> None:
        await self._channel.close()

    def build_job(
        self, job_id: str, collection: str, collection_id: str, request: DocumentsRequest
    ) -> ingest_pb2.IngestJob:
        """Clean and chunk every document (CPU work: run it in a thread)."""
        job = ingest_pb2.IngestJob(
            job_id=job_id, collection=collection, collection_id=collection_id, documents=len(request.documents)
        )
        for i, doc in enumerate(request.documents):
            text = clean_text(doc.text)
            if not text:
                raise invalid_request(f"documents[{i}].text is empty once cleaned.", param=f"documents[{i}].text")
            metadata = Struct()
            metadata.update(doc.metadata)
            for chunk in self._chunker.chunk(doc.id, clean_text(doc.title), text, doc.metadata):
                job.chunks.add(
                    chunk_id=chunk.chunk_id,
                    document_id=chunk.document_id,
                    title=chunk.title,
                    text=chunk.text,
                    metadata=metadata,
                )
        return job

    async def submit(self, collection: str, collection_id: str, request: DocumentsRequest, owner: str = "") -> Accepted:
        job_id = f"job-{uuid.uuid4().hex}"
        job = await asyncio.to_thread(self.build_job, job_id, collection, collection_id, request)
        try:
            await self._jobs.create(job_id, collection, len(request.documents), len(job.chunks), owner)
        except (RedisError, OSError) as exc:
            raise RagmeshError(ErrorKind.UNAVAILABLE, "The job store (Redis) is unavailable; retry shortly.") from exc
        try:
            channel = await asyncio.wait_for(self._channel.get(), timeout=self._settings.publish_timeout)
            await channel.default_exchange.publish(
                persistent_message(job.SerializeToString(), message_id=job_id, type_="ingest.job"),
                routing_key=self._topology.ingest_queue,
                timeout=self._settings.publish_timeout,
            )
        except (TimeoutError, AMQPError, aio_pika.exceptions.AMQPException, OSError, ConnectionError) as exc:
            log.warning("ingest job not queued", extra={"job": job_id, "error": repr(exc)})
            with contextlib.suppress(RedisError, OSError):
                await self._jobs.delete(job_id)
            raise RagmeshError(
                ErrorKind.UNAVAILABLE,
                "The ingestion queue (RabbitMQ) is unavailable; nothing was queued, retry shortly.",
                retry_after=5,
            ) from exc
        return Accepted(job_id, len(request.documents), len(job.chunks))
