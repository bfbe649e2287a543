"""Passwords never reach a screen or a log: every URL that is printed or logged goes through `mask_url`, and
every error text that may quote one (configparser, SQLAlchemy, Alembic) through `redact`.

Database and broker URLs carry their passwords (`postgresql://waifu:pw@db/waifu`, `redis://:pw@redis/0`);
healthcheck output is kept by `docker inspect`, and `waifu run` writes a log file, so both must show
`postgresql://waifu:***@db/waifu` instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

MASK = "***"
# a URL inside free text ends at white space or a quote (error messages quote it: 'postgresql://...')
URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`]+""")


def mask_url(url: str) -> str:
    """The URL with the password of its user part replaced by ***; everything else as it was.

    The user part runs up to the *last* `@` of the text after `scheme://`, so an unencoded `@` or `/` in a
    password is masked with the rest of it (masking too much beats showing a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return url  # a user name alone is not a secret
    return f"{scheme}://{user}:{MASK}@{hostpart}"


def url_passwords(urls: Iterable[str | None]) -> list[str]:
    """The passwords inside these URLs, as written and percent-decoded."""
    found: set[str] = set()
    for url in urls:
        if not url or "://" not in url:
            continue
        rest = url.partition("://")[2]
        if "@" not in rest:
            continue
        _user, colon, password = rest.rpartition("@")[0].partition(":")
        if colon and password:
            found |= {password, unquote(password)}
    return sorted(found, key=len, reverse=True)  # longest first: a short one may be part of a long one


def redact(text: str, urls: Iterable[str | None] = (), secrets: Iterable[str | None] = ()) -> str:
    """`text` with every URL in it masked, and the passwords of `urls` and the `secrets` replaced wherever
    they still appear (an error may quote a password outside of a URL)."""
    text = URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    for secret in [*url_passwords(urls), *sorted((s for s in secrets if s), key=len, reverse=True)]:
        if len(secret) >= 3:  # masking every "a" would make the text unreadable and protect nothing
            text = text.replace(secret, MASK)
    return text
