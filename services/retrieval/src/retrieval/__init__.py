"""ragmesh retrieval service: embeddings and search over collections."""
