"""ragmesh shared package: what every service needs once (settings, logging, errors, gRPC)."""
