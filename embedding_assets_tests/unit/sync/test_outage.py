"""The changes sensor's embedder probes while work waits out a backoff."""

from embedding_assets.sync.outage import PROBE_EVERY_SECONDS, EmbedderHealth


def test_probes_are_spaced_and_a_recovery_is_dated():
    health, asked = EmbedderHealth(), []

    def down() -> bool:
        asked.append("down")
        return False

    health.probe(100.0, down)
    health.probe(100.0 + PROBE_EVERY_SECONDS / 2, down)  # too soon: not asked
    assert asked == ["down"] and health.down_since == 100.0 and health.up_since is None
    health.probe(100.0 + PROBE_EVERY_SECONDS, lambda: True)
    assert health.down_since is None and health.up_since == 100.0 + PROBE_EVERY_SECONDS
    assert health.retry_now(99.0) and not health.retry_now(200.0)


def test_an_embedder_that_never_failed_a_probe_shortens_no_backoff():
    health = EmbedderHealth()
    health.probe(100.0, lambda: True)
    assert health.up_since is None and not health.retry_now(50.0)


def test_the_state_survives_the_cursor():
    health = EmbedderHealth(down_since=5.0, up_since=None, probed_at=6.0)
    assert EmbedderHealth.from_cursor(health.to_cursor()) == health
    assert EmbedderHealth.from_cursor({}) == EmbedderHealth()
