"""Text normalisation applied to every prompt before it reaches a model."""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 control characters and DEL, except tab, newline and carriage return:
# they carry no meaning for a model and some tokenizers choke on them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalize_text(text: str) -> str:
    """Unicode NFC, control characters removed. Whitespace is kept: it can matter (code, poems)."""
    if text.isascii():
        return _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))
