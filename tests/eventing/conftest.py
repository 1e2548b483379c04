"""Fixtures of the storage tests: moto's S3 server and the fault-injecting proxy (s3server.py), started
once per session on free localhost ports, and the server under test configured to reach S3 through
the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import pytest

from tests.conftest import Broker

from .s3server import FaultyProxy, create_bucket, isolated_env, moto_server, s3_options

BUCKET = "evllm"


class S3:
    def __init__(self, direct: str, proxy: FaultyProxy) -> None:
        self.direct, self.proxy = direct, proxy

    def fs(self) -> Any:
        """A client that bypasses the proxy (setting up inputs, checking results)."""
        return fsspec.filesystem("s3", **s3_options(self.direct), skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    tmp = tmp_path_factory.mktemp("s3")
    with pytest.MonkeyPatch.context() as mp, moto_server(tmp) as url:
        for name, value in isolated_env(tmp).items():
            mp.setenv(name, value)
        create_bucket(url, BUCKET)
        proxy = FaultyProxy(url)
        # What an operator sets with FSSPEC_S3='{...}': the server under test reaches S3 via the proxy.
        mp.setitem(fsspec.config.conf, "s3", s3_options(proxy.url))
        try:
            yield S3(url, proxy)
        finally:
            proxy.close()


@pytest.fixture
def proxy(s3: S3) -> Iterator[FaultyProxy]:
    s3.proxy.fraction, s3.proxy.faults = 0.0, ("503", "drop", "slow")
    s3.proxy.outage(0)
    s3.proxy.counts.clear()
    yield s3.proxy
    s3.proxy.fraction = 0.0
    s3.proxy.outage(0)


@pytest.fixture
def k_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    """A K_SINK that records what the server emits (chunk events); the test plays the Trigger."""
    b = Broker()
    b.forward = False
    b.thread.start()
    monkeypatch.setenv("K_SINK", b.url)
    yield b
    b.server.shutdown()
    b.server.server_close()
