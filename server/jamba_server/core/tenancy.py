"""Tenant isolation of the engine's prefix cache (issue 17).

vLLM shares prefix-cache blocks between any two requests with the same prompt prefix and the same
`cache_salt`. A shared block makes the second request's first token come sooner, so a client can
learn, by timing, whether someone else recently sent a given prefix (a system prompt, a document).
vLLM's own server leaves the salt to each client; here, with more than one API key, every request
gets its tenant's salt by default: a tenant is one key (`prefix_cache_isolation: key`) or a named
group of keys that trust each other (`group`); `off` restores vLLM's behaviour.

- A tenant's salt is a one-way hash of its key (or of its group's name), so it never reveals the key.
  It is deterministic, not keyed by a per-process secret: the same key gets the same salt on every
  replica and after a restart, so a KV cache shared between engines (vLLM's connectors) still serves
  a tenant its own blocks. Keys are at least 16 characters (http/auth.py), too many to guess back
  from the hash.
- A request's own `cache_salt` is combined with its tenant's, never used alone: within a tenant,
  different request salts still keep their caches apart, and no request salt can equal another
  tenant's salt (or a salt another tenant's request would produce).
- Every salt made here is hex with one `-`: within vLLM's 128 characters and free of `@ / \\ NUL`.

Pure: the HTTP layer (http/auth.py, http/middleware.py) finds which key a request sent and hands the
pipeline that key's `Tenant`, never the key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

Isolation = Literal["key", "group", "off"]
# Versioned so a change of derivation can never make an old salt and a new one equal.
_DOMAIN = b"jamba-server cache_salt v1\x00"
_SALT_HEX = 32  # 128 bits of SHA-256
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FINGERPRINT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Tenant:
    """Whom a request came from, as far as the prefix cache is concerned: a loggable name (`group
    NAME`, or `key` and the first 8 hex digits of the key's fingerprint) and its cache salt."""

    name: str
    cache_salt: str


def key_fingerprint(key: str) -> str:
    """SHA-256 of the key in hex, as `printf %s KEY | sha256sum` prints it: how `prefix_cache_groups`
    names a key without holding it."""
    return hashlib.sha256(key.encode()).hexdigest()


def _salt(kind: bytes, material: str) -> str:
    return hashlib.sha256(_DOMAIN + kind + b"\x00" + material.encode()).hexdigest()[:_SALT_HEX]


def cache_tenants(
    keys: Sequence[str], isolation: Isolation, groups: Mapping[str, Sequence[str]] | None = None
) -> tuple[Tenant | None, ...]:
    """The tenant of each key, in the keys' order. None for every key with isolation off or at most
    one key (one tenant has nobody to be isolated from). With `group`, the keys whose fingerprints a
    group lists share the group's tenant; any other key is its own."""
    if isolation == "off" or len(keys) <= 1:
        return tuple(None for _ in keys)
    group_of = {fp: name for name, fps in (groups or {}).items() for fp in fps} if isolation == "group" else {}
    tenants = []
    for key in keys:
        fingerprint = key_fingerprint(key)
        group = group_of.get(fingerprint)
        if group is not None:
            tenants.append(Tenant(f"group {group}", _salt(b"group", group)))
        else:
            tenants.append(Tenant(f"key {fingerprint[:8]}", _salt(b"key", key)))
    return tuple(tenants)


def check_prefix_cache_groups(groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Group names are short names; each lists at least one fingerprint (64 hex digits, case folded
    here), and a key is in one group at most. Raises ValueError naming the group and position."""
    seen: dict[str, str] = {}
    checked: dict[str, list[str]] = {}
    for name, fingerprints in groups.items():
        if not GROUP_NAME.fullmatch(name):
            raise ValueError(f"group name {name[:64]!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not fingerprints:
            raise ValueError(f"group {name} lists no key fingerprint")
        checked[name] = []
        for i, raw in enumerate(fingerprints):
            fingerprint = raw.strip().lower()
            if not FINGERPRINT.fullmatch(fingerprint):
                raise ValueError(
                    f"group {name}, fingerprint {i}: expected the key's SHA-256 in hex, 64 characters "
                    "(`printf %s KEY | sha256sum`), not the key itself (the value is not shown)"
                )
            if fingerprint in seen:
                raise ValueError(f"group {name}, fingerprint {i}: that key is already in group {seen[fingerprint]}")
            seen[fingerprint] = name
            checked[name].append(fingerprint)
    return checked


def check_groups_match_keys(groups: Mapping[str, Sequence[str]], isolation: Isolation, keys: Sequence[str]) -> None:
    """Groups are for `group` isolation (with `key` they would be silently ignored; `off` turns
    isolation off whatever is configured), `group` needs groups, and every fingerprint must be of a
    configured key (a typo would otherwise leave that key alone)."""
    if isolation == "group" and not groups:
        raise ValueError("prefix_cache_isolation is group, but prefix_cache_groups names no group")
    if isolation == "key" and groups:
        raise ValueError("prefix_cache_groups needs prefix_cache_isolation: group (it is key)")
    configured = {key_fingerprint(key) for key in keys}
    for name, fingerprints in groups.items():
        for i, fingerprint in enumerate(fingerprints):
            if fingerprint not in configured:
                raise ValueError(
                    f"prefix_cache_groups: group {name}, fingerprint {i} ({fingerprint[:8]}...) "
                    "is the SHA-256 of none of the api_keys"
                )


def scoped_cache_salt(request_salt: str | None, tenant: Tenant | None) -> str | None:
    """The salt the engine gets: the request's as is without a tenant (vLLM's behaviour); else the
    tenant's, joined by a hash of the request's own salt when it sent one."""
    if tenant is None:
        return request_salt
    if request_salt is None:
        return tenant.cache_salt
    return f"{tenant.cache_salt}-{_salt(tenant.cache_salt.encode(), request_salt)}"
