"""Where the file store writes a file before renaming it into place."""

from pathlib import Path

import redis.asyncio as aioredis

from preprocess.files import FileStore


def test_two_writers_of_the_same_file_never_share_a_temporary_path(tmp_path: Path) -> None:
    """Two finalizers of one batch in one process (the first outlived its lease, so a status read
    took its work over) write the same output file id at once: each must write its own temporary
    file, or the renamed file mixes their lines."""
    store = FileStore(aioredis.Redis(), tmp_path, "ns")
    first, second = store.temp_path("file-x-output"), store.temp_path("file-x-output")
    assert first != second
    assert first.parent == second.parent == tmp_path  # same folder as the file: the rename stays on one disk
