"""Entry point: python -m retrieval."""

from __future__ import annotations

import os


def main() -> None:
    """Start the retrieval service."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from retrieval.server import serve
    from retrieval.settings import RetrievalSettings

    serve(RetrievalSettings())


if __name__ == "__main__":
    main()
