"""One decoding policy for text a user hands us (prompts, stop strings, prompt files, data rows):
strict UTF-8. Text that is not UTF-8 is refused in one sentence naming where it came from and
the byte offset; nothing is replaced or dropped silently.

A `str` can carry text that is not UTF-8 too: on Linux, argv bytes that do not decode arrive as
surrogate escapes (PEP 383), and JSON's `"\\ud800"` decodes to a lone surrogate. Neither can be
encoded for a tokenizer, so both are caught here rather than deep inside one.
"""
from __future__ import annotations

import codecs
import re
from typing import Optional, Type, Union

from .errors import ReflexError, UsageError

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> Optional[int]:
    """The index of the first surrogate code point in `text` (which no UTF-8 can hold), or None."""
    m = _SURROGATE.search(text)
    return m.start() if m else None


def decode_user_text(raw: Union[bytes, str], what: str,
                     error: Type[ReflexError] = UsageError) -> str:
    """`raw` as text, or `error` naming `what` (e.g. "--prompt", "--prompt_file 'p.txt'") and the
    byte offset of the first byte that is not UTF-8. A leading UTF-8 byte-order mark is dropped."""
    if isinstance(raw, str):
        i = lone_surrogate(raw)
        if i is None:
            return raw
        try:  # surrogate escapes of argv: the bytes the user gave, to find the offset in them
            raw = raw.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that stands for no byte (e.g. JSON's \ud800)
            at = len(raw[:i].encode("utf-8", "surrogatepass"))
            raise error(f"{what} holds the lone surrogate U+{ord(raw[i]):04X} at byte {at}, which "
                        "is not text; remove it or give the text in UTF-8.") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        where = f"byte {at} (line {line})" if b"\n" in raw else f"byte {at}"
        raise error(f"{what} is not valid UTF-8 at {where}, byte 0x{raw[at]:02x}; give the text "
                    "in UTF-8 (e.g. iconv -f <encoding> -t utf-8).") from None
