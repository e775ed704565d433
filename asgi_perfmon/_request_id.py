"""Request ids: taken from a safe incoming header, else generated."""

from __future__ import annotations

import random
import re

_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of the (lower-case) header ``name``, or ``None``."""
    for key, value in headers:
        if key == name:
            return value
    return None


def request_id_from(incoming: bytes | None) -> str:
    """``incoming`` when it is short and safe to log and echo, else a new random id."""
    if incoming is not None and _SAFE_REQUEST_ID.fullmatch(incoming):
        return incoming.decode("ascii")
    # 128 random bits, like uuid4().hex at a tenth of the cost; ids need to be unique, not
    # unguessable (random reseeds itself in forked workers).
    return f"{random.getrandbits(128):032x}"
