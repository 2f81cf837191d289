"""Prefix-cache tenants (core/tenancy.py): salts derived from keys or groups, combined with a
request's own salt, always within vLLM's cache_salt bounds and never revealing the key."""

import hashlib

import pytest

from jamba_server.core.tenancy import (
    Tenant,
    cache_tenants,
    check_groups_match_keys,
    check_prefix_cache_groups,
    key_fingerprint,
    scoped_cache_salt,
)
from jamba_server.protocol import CACHE_SALT_MAX_LENGTH, SamplingFields
from vllm.entrypoints.generate.base.protocol import validate_cache_salt

A, B, C = "sk-tenant-a-0123456789abcdef", "sk-tenant-b-0123456789abcdef", "sk-tenant-c-0123456789abcdef"


def _valid_for_vllm(salt: str) -> bool:
    """vLLM's own check (which raises) and ours on a request's field."""
    validate_cache_salt(salt)
    SamplingFields(model="m", cache_salt=salt)
    return True


def test_each_key_is_its_own_tenant_with_a_salt_that_hides_the_key():
    a, b, c = cache_tenants([A, B, C], "key")
    assert len({a.cache_salt, b.cache_salt, c.cache_salt}) == 3
    for key, tenant in ((A, a), (B, b), (C, c)):
        assert key not in tenant.cache_salt and key not in tenant.name
        assert tenant.cache_salt not in (key_fingerprint(key), hashlib.sha256(key.encode()).hexdigest()[:32])
        assert tenant.name == f"key {key_fingerprint(key)[:8]}" and _valid_for_vllm(tenant.cache_salt)
    assert cache_tenants([A, B, C], "key") == (a, b, c)  # deterministic: the same on every replica


def test_no_tenants_when_off_or_with_one_key_or_none():
    assert cache_tenants([A, B], "off") == (None, None)
    assert cache_tenants([A], "key") == (None,) and cache_tenants([], "key") == ()
    assert cache_tenants([A], "group", {"team": [key_fingerprint(A)]}) == (None,)


def test_keys_of_a_group_share_its_tenant_and_other_keys_stay_alone():
    a, b, c = cache_tenants([A, B, C], "group", {"team": [key_fingerprint(A), key_fingerprint(C)]})
    assert a == c == Tenant("group team", a.cache_salt) and b != a
    assert b == cache_tenants([A, B, C], "key")[1]  # an ungrouped key keeps its own tenant
    assert _valid_for_vllm(a.cache_salt)
    # groups count only with `group` isolation
    assert cache_tenants([A, B, C], "key", {"team": [key_fingerprint(A), key_fingerprint(C)]})[0] != c


def test_a_request_salt_is_combined_with_its_tenants():
    a, b = cache_tenants([A, B], "key")
    assert scoped_cache_salt(None, a) == a.cache_salt
    mine, theirs = scoped_cache_salt("shared", a), scoped_cache_salt("shared", b)
    assert mine != theirs and mine != a.cache_salt  # one salt, two tenants: two caches
    assert scoped_cache_salt("other", a) not in (mine, a.cache_salt)  # within a tenant, salts still separate
    assert scoped_cache_salt("shared", a) == mine
    # a client cannot name another tenant's salt, nor what another tenant's salted request gets
    assert scoped_cache_salt(b.cache_salt, a) != b.cache_salt
    assert scoped_cache_salt(theirs, a) not in (theirs, b.cache_salt)
    longest = "x" * CACHE_SALT_MAX_LENGTH
    assert "shared" not in mine and _valid_for_vllm(mine) and _valid_for_vllm(scoped_cache_salt(longest, a))


def test_without_a_tenant_the_request_salt_is_used_as_is():
    assert scoped_cache_salt("tenant-a", None) == "tenant-a" and scoped_cache_salt(None, None) is None


def test_groups_are_checked_naming_the_group_and_never_showing_a_key():
    fp_a = key_fingerprint(A)
    assert check_prefix_cache_groups({"team-1": [fp_a.upper()]}) == {"team-1": [fp_a]}
    with pytest.raises(ValueError, match="not the key itself") as info:
        check_prefix_cache_groups({"team": [A]})
    assert A not in str(info.value)
    with pytest.raises(ValueError, match="already in group one"):
        check_prefix_cache_groups({"one": [fp_a], "two": [fp_a]})
    with pytest.raises(ValueError, match="lists no key"):
        check_prefix_cache_groups({"team": []})
    with pytest.raises(ValueError, match="group name"):
        check_prefix_cache_groups({"a team": [fp_a]})


def test_groups_must_fit_the_isolation_and_name_configured_keys():
    groups = {"team": [key_fingerprint(A), key_fingerprint(B)]}
    check_groups_match_keys(groups, "group", [A, B, C])
    check_groups_match_keys(groups, "off", [A, B, C])  # off turns isolation off, groups and all
    with pytest.raises(ValueError, match="names no group"):
        check_groups_match_keys({}, "group", [A, B])
    with pytest.raises(ValueError, match="needs prefix_cache_isolation: group"):
        check_groups_match_keys(groups, "key", [A, B])
    with pytest.raises(ValueError, match=r"group team, fingerprint 1 .* none of the api_keys") as info:
        check_groups_match_keys(groups, "group", [A, C])
    assert B not in str(info.value)
