"""The HTTP layer, in the shape of vLLM's entrypoints: one APIRouter per API family.

Routes read the request (body, headers, the client's disconnect), call the
serving layer (`preprocess.serving`, which knows nothing of HTTP) and render
its answer. What a route needs comes as typed `Annotated` dependencies
(`api.deps`); request bodies are read and validated by ragmesh itself, so
every error is OpenAI's shape (never FastAPI's 422), and declared with the
route so /openapi.json describes them (`api.openapi`).
"""
