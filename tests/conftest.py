from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One private Mosquitto for tests that do not inject broker faults."""
    with Broker(tmp_path_factory.mktemp("shared-broker")) as broker:
        yield broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Mosquitto of this test's own, free to be killed and restarted."""
    with Broker(tmp_path / "broker") as b:
        yield b
