"""Entry point: python -m inference."""

from __future__ import annotations

import os


def main() -> None:
    """Start the inference service."""
    # Before numpy/ggml load: oversubscribed OpenMP threads make a 2-core box crawl.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from inference.server import serve
    from inference.settings import InferenceSettings

    serve(InferenceSettings())


if __name__ == "__main__":
    main()
