"""Request ids: the caller's (``X-Request-Id`` header / ``x-request-id`` metadata) or new."""

from __future__ import annotations

import re
import uuid

HEADER = "x-request-id"

# A caller's id is kept only if it is short and plain: it goes into log lines and replies.
_USABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The caller's request id when it is usable, else a new one."""
    if given is not None and _USABLE.fullmatch(given):
        return given
    return uuid.uuid4().hex[:16]
