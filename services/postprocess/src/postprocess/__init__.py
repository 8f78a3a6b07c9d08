"""ragmesh postprocess service: turns raw generation into client-ready OpenAI output."""
