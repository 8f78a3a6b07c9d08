"""ragmesh inference service: runs models behind the Inference gRPC contract."""
