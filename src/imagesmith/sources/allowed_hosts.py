"""The entries of `pexels_allowed_hosts`: where photos may be downloaded from. No heavy imports: the settings
check every entry when they load, so a mistyped one stops the start with the fix instead of refusing every
download later."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"https": 443, "http": 80}
# A bare entry is a host name or an IPv4 address, nothing else: 'host:8080' or 'host/path' would be taken as a
# host name that no URL has, and every download refused with a message naming it as allowed.
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_SETTING = "IMAGESMITH_PEXELS_ALLOWED_HOSTS"


@dataclass(frozen=True)
class AllowedOrigin:
    scheme: str
    host: str
    port: int | None  # None: any port

    @classmethod
    def parse(cls, entry: str) -> AllowedOrigin:
        entry = entry.strip().lower()
        if "://" not in entry:
            host = entry.rstrip("/")
            if not _HOST_NAME.fullmatch(host):
                hint = (
                    f"; for a port write 'https://{host}' (or 'http://...' for a local stand-in)"
                    if ":" in host
                    else ""
                )
                raise ValueError(
                    f"allowed host {entry!r} ({_SETTING}) must be a host name such as images.pexels.com "
                    f"or an http(s)://host[:port] origin{hint}"
                )
            return cls("https", host, None)
        parts = urlsplit(entry)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port == -1:
            raise ValueError(
                f"allowed host {entry!r} ({_SETTING}) must be a host name or an http(s)://host[:port] origin"
            )
        # An origin is scheme, host and port: a path was dropped without a word, and a user:password was kept
        # (and printed by `doctor`) though no download may carry credentials.
        if parts.username is not None or parts.password is not None or parts.path not in ("", "/"):
            raise ValueError(
                f"allowed host {_without_credentials(entry)!r} ({_SETTING}) must be an origin, "
                f"http(s)://host[:port], with no user, password or path: write "
                f"'{parts.scheme}://{parts.hostname}" + (f":{port}'" if port else "'")
            )
        if parts.query or parts.fragment:
            raise ValueError(
                f"allowed host {entry!r} ({_SETTING}) must be an origin, http(s)://host[:port], with no query"
            )
        return cls(parts.scheme, parts.hostname, port)

    def allows(self, scheme: str, host: str, port: int) -> bool:
        return scheme == self.scheme and host == self.host and (self.port is None or port == self.port)


def _without_credentials(entry: str) -> str:
    """The entry with any user:password@ replaced, so an error message does not repeat a secret."""
    return re.sub(r"//[^/@]*@", "//...@", entry)


def parse_allowed_hosts(entries: list[str]) -> list[AllowedOrigin]:
    """Every entry parsed (ValueError naming the first bad one); an empty list is refused, since every photo
    download would be."""
    origins = [AllowedOrigin.parse(entry) for entry in entries if entry.strip()]
    if not origins:
        raise ValueError(
            f"{_SETTING} is empty, so every photo download would be refused; leave it unset for images.pexels.com"
        )
    return origins
