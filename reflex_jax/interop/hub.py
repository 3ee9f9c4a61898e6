"""Checkpoints named by an HF hub id: telling an id from a path, and fetching a snapshot with
every failure (offline, unknown or gated repo) ending in one sentence."""
from __future__ import annotations

import re
from typing import Sequence

from ..errors import ConvertError


def looks_like_hub_id(name: str, require_owner: bool = False) -> bool:
    """`owner/name` (or a bare `name` unless `require_owner`), not a relative or home path."""
    pattern = r"[\w.-]+/[\w.-]+" if require_owner else r"[\w.-]+(/[\w.-]+)?"
    return bool(re.fullmatch(pattern, name)) and not name.startswith((".", "~"))


def snapshot(hub_id: str, patterns: Sequence[str], flag: str, local: str) -> str:
    """The local directory of `hub_id`'s files matching `patterns`; `flag` and `local` (what the
    flag takes locally) name the fix in the error."""
    from huggingface_hub import snapshot_download

    from ..hub_access import OFFLINE_HINT, unreachable_reason
    why = unreachable_reason()
    if why:
        raise ConvertError(f"{flag} {hub_id!r} is not {local}, and the HF hub cannot be reached to "
                           f"fetch it ({why}); download it where there is network and pass the "
                           f"local directory instead, or {OFFLINE_HINT}.")
    try:
        return snapshot_download(hub_id, allow_patterns=list(patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{flag} {hub_id!r} is not {local} and could not be fetched from the "
                           f"HF hub ({first}); download it where there is network and pass the "
                           "local directory instead.") from None
