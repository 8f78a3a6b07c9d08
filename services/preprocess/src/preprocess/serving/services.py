"""Every serving object of one preprocess process, built once when it starts."""

from __future__ import annotations

from dataclasses import dataclass

from preprocess.clients import MeshClients
from preprocess.keys import KeyStore
from preprocess.serving.admin import AdminServing
from preprocess.serving.chat import ChatServing
from preprocess.serving.embeddings import EmbeddingsServing
from preprocess.serving.forward import ForwardServing
from preprocess.serving.models import ModelsServing
from preprocess.serving.rerank import RerankServing
from preprocess.serving.retrieval import RetrievalServing
from preprocess.settings import PreprocessSettings


@dataclass
class Serving:
    settings: PreprocessSettings
    clients: MeshClients
    keys: KeyStore
    chat: ChatServing
    embeddings: EmbeddingsServing
    retrieval: RetrievalServing
    models: ModelsServing
    admin: AdminServing
    forward: ForwardServing
    rerank: RerankServing
