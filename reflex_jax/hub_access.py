"""Whether the HF hub can be reached at all, asked before a hub call (datasets, tokenizers,
snapshots): without a network the hub libraries retry for about 23 s, printing a line per try,
before their own error. Name resolution of the hub's host fails at once, so a machine without a
network gets its one sentence at once. A proxy, or HF_HUB_OFFLINE=1 (a copy in the HF cache),
skips the check: the hub libraries then decide."""
from __future__ import annotations

import os
import socket
from typing import Optional
from urllib.parse import urlparse

OFFLINE_HINT = "HF_HUB_OFFLINE=1 uses a copy already in the HF cache"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""


def unreachable_reason() -> Optional[str]:
    """Why the hub surely cannot be reached from here ("name resolution of huggingface.co failed"),
    or None when it may be (or when the hub libraries should decide: offline mode, a proxy)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    host = hub_host()
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as e:
        return f"name resolution of {host} failed: {e.strerror or e}"
    return None

