"""The serving layer: what each endpoint does, with no HTTP in it.

Each module here takes validated requests (pydantic models from
`preprocess.protocol`) and returns OpenAI-shaped results (dicts, or SSE events
for streams), raising `RagmeshError` for anything a client should see as an
error. Nothing here imports starlette or fastapi (a test checks it), so the
same code serves HTTP routes (`preprocess.api`), batch lines and the direct
queue protocol (`preprocess.batches`), and any other front a later protocol
adds (Ollama's API, say):

- `services.Serving`: every serving object of one process, built once at start.
- `operations`: THE table from a URL to its request model and handler, shared by
  the HTTP routes and the batch runner.
- `chat`, `embeddings`, `retrieval`, `models`, `admin`: one module per API family.
- `schemas`: the response shapes, for /openapi.json.
- `sse`: server-sent events as OpenAI streams them.
"""
