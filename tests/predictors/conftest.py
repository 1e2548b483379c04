"""The hardened server: one extra real `evllm serve` with auth, tight limits and a small admission limit.

It serves test_auth, test_limits, test_admission, test_logs and test_fuzz; test_shutdown SIGTERMs it
last (its kills_engine marker sorts it to the end of the session). It depends on the session `server`
so it starts inside the session's engine lock (two engines at most, never two test sessions' worth).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import MODEL_NAME
from tests.server import TEST_ENGINE_ARGS, ServerProcess

ENV_KEY = "env-key-0123456789"
FILE_KEY = "file-key-abcdefghij"
ISSUER = "https://issuer.evllm.test"
AUDIENCE = "evllm-predictor"
KID = "test-key-1"

# The hardened server's limits (tests assert against these numbers).
ADMISSION_LIMIT = 2
RETRY_AFTER = 2
MAX_TOKENS_LIMIT = 256
MAX_PROMPTS = 3
MAX_PROMPT_TOKENS = 48
MAX_REQUEST_BYTES = 32 * 1024
MAX_EVENT_BYTES = 64 * 1024
MAX_BATCH_LINES = 5
DRAIN_SECONDS = 3
GRACE_PERIOD = 40


@dataclass
class Hardened:
    proc: ServerProcess
    private_key: Any
    storage: Path

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ENV_KEY}"}

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "tester", "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private_key, algorithm="RS256", headers={"kid": KID})


def write_jwks(path: Path, private_key: Any, kid: str = KID) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    path.write_text(json.dumps({"keys": [jwk]}))


@pytest.fixture(scope="session")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def hardened(
    server, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, rsa_key: Any
) -> Iterator[Hardened]:
    secrets = tmp_path_factory.mktemp("secrets")
    storage = tmp_path_factory.mktemp("hardened-storage")
    (secrets / "api-keys").write_text(f"# rotated by the Secret\n{FILE_KEY}\n")
    write_jwks(secrets / "jwks.json", rsa_key)
    proc = ServerProcess(
        [
            "--model_name", MODEL_NAME,
            "--model_dir", str(demo_model_dir),
            "--storage_roots", str(storage),
            "--api_keys_file", str(secrets / "api-keys"),
            "--jwt_jwks_file", str(secrets / "jwks.json"),
            "--jwt_issuer", ISSUER,
            "--jwt_audience", AUDIENCE,
            "--max_concurrent_requests", str(ADMISSION_LIMIT),
            "--retry_after_seconds", str(RETRY_AFTER),
            "--max_tokens_limit", str(MAX_TOKENS_LIMIT),
            "--max_prompts_per_request", str(MAX_PROMPTS),
            "--max_prompt_tokens", str(MAX_PROMPT_TOKENS),
            "--max_request_bytes", str(MAX_REQUEST_BYTES),
            "--max_event_bytes", str(MAX_EVENT_BYTES),
            "--max_batch_lines", str(MAX_BATCH_LINES),
            "--drain_seconds", str(DRAIN_SECONDS),
            "--grace_period", str(GRACE_PERIOD),
            *TEST_ENGINE_ARGS,
        ],
        env={"EVLLM_API_KEYS": ENV_KEY},
        log_name="hardened-server",
    )  # fmt: skip
    proc.start()
    try:
        yield Hardened(proc, rsa_key, storage)
    finally:
        proc.stop()
