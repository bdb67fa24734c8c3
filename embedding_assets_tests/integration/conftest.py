"""Fixtures the integration tests share: a Dagster instance of the test's own, and an
OpenAI-compatible embedding server on 127.0.0.1 that records what it embeds."""

from collections.abc import Iterator

import dagster as dg
import pytest

from embedding_assets_tests.fakes.provider_server import ProviderServer


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture
def fake() -> Iterator[ProviderServer]:
    """8-dimensional vectors; `fake.requests` holds every request with its inputs."""
    with ProviderServer("openai", dim=8) as server:
        yield server
