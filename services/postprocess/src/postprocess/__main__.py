"""Entry point: python -m postprocess."""

from __future__ import annotations


def main() -> None:
    """Start the postprocess service."""
    from postprocess.server import serve
    from postprocess.settings import PostprocessSettings

    serve(PostprocessSettings())


if __name__ == "__main__":
    main()
