"""Credentials in URLs: taken out before a URL is used, shown as `***` wherever it is written or printed.

A server URL may carry a user name and password (`http://USER:PASSWORD@host/`) or a key in its query
(`?api_key=...`). Such URLs reach bank metadata (`metadata.source`), stage files, reports and error
messages, so every one of them goes through `redact_url` (one URL) or `redact_text` (free text that
may hold URLs and known secrets) first; the clients send the credentials as an HTTP header instead
(`split_credentials`). Query values are all redacted, not only those with secret-looking names: a
base URL rarely has a query, and guessing which names are secret fails open.
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"

# a URL in free text: scheme://, then up to whitespace or a quote
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without its user name and password, the user name, the password), both decoded
    (`p%40ss` -> `p@ss`); None where absent."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    username, _, password = userinfo.partition(":")
    clean = urlunsplit(parts._replace(netloc=host))
    return clean, unquote(username) if username else None, unquote(password) if ":" in userinfo else None


def redact_url(url: str) -> str:
    """`url` with its user name and password replaced by `***` and every query value by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: hide everything after the scheme
        return re.sub(r"://.*", f"://{MASK}", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        query = urlencode([(name, MASK) for name, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every URL in it redacted (`redact_url`) and every given secret replaced by `***`."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def url_secrets(url: str) -> tuple[str, ...]:
    """The secrets a URL carries (its password, and its query values), raw and decoded, for `redact_text`."""
    parts = urlsplit(url)
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, unquote(userinfo)]
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            found += [password, unquote(password)]
    found += [value for _, value in parse_qsl(parts.query, keep_blank_values=False)]
    return tuple(s for s in found if s)
