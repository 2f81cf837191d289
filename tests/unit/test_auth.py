import hmac

import pytest

from jamba_server.http.auth import MIN_API_KEY_LENGTH, ApiKeyChecker

K1, K2 = "sk-test-key-one-0123456789", "sk-test-key-two-0123456789"


def test_keys_and_open_paths():
    checker = ApiKeyChecker([K1, K2])
    assert checker.accepts(f"Bearer {K1}") and checker.accepts(f"bearer {K2}")
    for header in (None, "", "Bearer", "Bearer sk-test-key-three-0123456789", f"Basic {K1}", K1, f"Bearer {K1}x"):
        assert not checker.accepts(header), header
    assert checker.is_open("/health") and checker.is_open("/ready") and checker.is_open("/metrics")
    assert not checker.is_open("/v1/chat/completions") and not checker.is_open("/openapi.json")
    assert not ApiKeyChecker([K1], metrics_require_auth=True).is_open("/metrics")
    assert ApiKeyChecker([]).is_open("/v1/chat/completions")  # no keys: open server


def test_comparison_is_constant_time_over_all_keys(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    checker = ApiKeyChecker(["sk-test-first-0123456789", "sk-test-second-key-0123456789", "sk-test-third-0123456789"])
    assert checker.accepts("Bearer sk-test-first-0123456789")
    # every configured key is compared, as fixed-length digests, even after a match
    assert calls == [(32, 32)] * 3
    calls.clear()
    assert not checker.accepts("Bearer a-much-longer-wrong-key-than-any-of-the-configured-ones")
    assert calls == [(32, 32)] * 3


def test_a_string_is_not_a_list_of_keys():
    """A string iterates as its characters: `sk-live-SECRET` would accept `s`, `1`, `E`, ..."""
    with pytest.raises(TypeError, match="list of keys") as info:
        ApiKeyChecker("sk-live-SECRET-0123456789")
    assert "SECRET" not in str(info.value)
    with pytest.raises(TypeError, match="not a string"):
        ApiKeyChecker([b"sk-live-SECRET-0123456789"])


def test_short_keys_are_refused_without_showing_them():
    assert MIN_API_KEY_LENGTH == 16
    ApiKeyChecker(["x" * MIN_API_KEY_LENGTH])
    with pytest.raises(ValueError, match=r"api_keys\[1\] is shorter than 16") as info:
        ApiKeyChecker([K1, "Zq9-short"])
    assert "Zq9" not in str(info.value)
    for single in "sk-live-SECRET":
        with pytest.raises(ValueError):
            ApiKeyChecker([single])


def test_match_names_the_key_sent_by_position_either_header():
    checker = ApiKeyChecker([K1, K2])
    assert checker.match(f"Bearer {K1}") == 0 and checker.match(None, K2) == 1
    assert checker.match(f"Bearer {K2}", K1) == 1  # both headers: the bearer's key counts
    assert checker.match("Bearer sk-test-key-three-0123456789", K1) == 0  # a wrong bearer, a right x-api-key
    assert checker.match("Bearer sk-test-key-three-0123456789", "") is None and checker.match(None) is None
