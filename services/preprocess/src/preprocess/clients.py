"""gRPC clients of the services preprocess orchestrates, opened once per process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from preprocess.settings import PreprocessSettings
from ragmesh.grpc_client import check_health, create_channel
from ragmesh.v1 import (
    inference_pb2_grpc,
    postprocess_pb2_grpc,
    retrieval_pb2_grpc,
)


@dataclass
class MeshClients:
    inference: inference_pb2_grpc.InferenceAsyncStub
    postprocess: postprocess_pb2_grpc.PostprocessAsyncStub
    retrieval: retrieval_pb2_grpc.RetrievalAsyncStub
    channels: dict[str, grpc.aio.Channel]

    @classmethod
    def connect(cls, settings: PreprocessSettings) -> MeshClients:
        channels = {
            "inference": create_channel(settings.inference_addr),
            "postprocess": create_channel(settings.postprocess_addr),
            "retrieval": create_channel(settings.retrieval_addr),
        }
        return cls(
            inference=inference_pb2_grpc.InferenceStub(channels["inference"]),
            postprocess=postprocess_pb2_grpc.PostprocessStub(channels["postprocess"]),
            retrieval=retrieval_pb2_grpc.RetrievalStub(channels["retrieval"]),
            channels=channels,
        )

    async def ready(self) -> dict[str, str]:
        """gRPC health of every peer: "ok" or the reason it is not."""
        names = list(self.channels)
        results = await asyncio.gather(*(check_health(self.channels[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels.values()))
