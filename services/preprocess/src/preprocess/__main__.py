"""Entry point: python -m preprocess."""

from __future__ import annotations


def main() -> None:
    """Start the preprocess service."""
    from preprocess.app import serve
    from preprocess.settings import PreprocessSettings

    serve(PreprocessSettings())


if __name__ == "__main__":
    main()
