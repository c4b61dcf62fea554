from keychain.sync import SyncKeychain


def test_sync_facade_reads_through_and_hits(settings, keychain, sm, secret):
    secret_id, value = secret
    ref = f"projects/test-project/secrets/{secret_id}/versions/1"
    with SyncKeychain(settings) as kc:
        assert kc.get("openai", execution_id=9).outcome == "miss"
        assert kc.get_or_fetch("openai", ref, execution_id=9).value == value
        assert kc.get("openai", execution_id=9).value == value
        kc.put("other", {"a": 1}, session_id="s1")
        assert kc.get("other", session_id="s1").value == {"a": 1}
    assert sm.access_count(secret_id) == 1
