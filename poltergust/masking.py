"""Masking secret values in text before it reaches a log, a result file or the bucket.

One function, used by the run log, the environment builder and result
reasons, so that a value masked in one place is masked in all of them, in
every form a program is likely to print it (as is, URL-encoded).
"""
from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import quote, quote_plus

MASK = "****"
MIN_LENGTH = 4
"""Shorter values would mask innocent text everywhere; they are not treated as secrets."""


def forms(secret: str) -> set[str]:
    """The ways a secret may appear in output: as is and URL-encoded."""
    return {secret, quote(secret, safe=""), quote_plus(secret)} - {""}


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every form of every secret replaced by `****` (longest first, so no part survives)."""
    variants = sorted({form for secret in secrets if len(secret) >= MIN_LENGTH for form in forms(secret)},
                      key=len, reverse=True)
    for variant in variants:
        text = text.replace(variant, MASK)
    return text


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")
_QUERY = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.-]*://[^\s?]*)\?[^\s]*")


def redact_url(text: str) -> str:
    """`text` with every URL's `user:password@` and query string (which often carry tokens) masked."""
    text = _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m.group('url')}?{MASK}", text)
