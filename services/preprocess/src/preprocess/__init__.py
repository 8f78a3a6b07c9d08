"""ragmesh preprocess service: the OpenAI-compatible front of the pipeline."""
