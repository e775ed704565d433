"""Request ids: taken from a safe incoming header, else generated."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def request_id_of(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    """The first value of the (lower-case) header ``name`` when it is short and safe to log
    and echo, else a new random id."""
    for key, value in headers:
        if key == name:
            if _SAFE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    # 128 random bits, like uuid4().hex at a tenth of the cost; ids need to be unique, not
    # unguessable (random reseeds itself in forked workers).
    return random.getrandbits(128).to_bytes(16, "big").hex()
