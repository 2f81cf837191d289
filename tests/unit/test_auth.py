import hmac

from jamba_server.auth import ApiKeyChecker


def test_keys_and_open_paths():
    checker = ApiKeyChecker(["k1", "k2"])
    assert checker.accepts("Bearer k1") and checker.accepts("bearer k2")
    for header in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1", "Bearer k1x"):
        assert not checker.accepts(header), header
    assert checker.is_open("/health") and checker.is_open("/ready") and checker.is_open("/metrics")
    assert not checker.is_open("/v1/chat/completions") and not checker.is_open("/openapi.json")
    assert not ApiKeyChecker(["k"], metrics_require_auth=True).is_open("/metrics")
    assert ApiKeyChecker([]).is_open("/v1/chat/completions")  # no keys: open server


def test_comparison_is_constant_time_over_all_keys(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    checker = ApiKeyChecker(["first", "second-key", "third"])
    assert checker.accepts("Bearer first")
    # every configured key is compared, as fixed-length digests, even after a match
    assert calls == [(32, 32)] * 3
    calls.clear()
    assert not checker.accepts("Bearer a-much-longer-wrong-key")
    assert calls == [(32, 32)] * 3
