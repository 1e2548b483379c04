"""Fixtures of tests/predictors: everything runs in-process (tests/inprocess.py) unless marked slow, and
slow tests use the session's real servers (tests/conftest.py): no server of its own here."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa


@pytest.fixture(scope="session")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)
