"""Auth: API keys (env + rotating Secret file) and JWT bearer tokens, on every route but health/readiness."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from predictors.auth import AuthConfig, Authenticator
from predictors.errors import Unauthorized
from tests.conftest import MODEL_NAME
from tests.predictors.conftest import AUDIENCE, ENV_KEY, FILE_KEY, ISSUER, KID, write_jwks


def _args(**overrides: Any) -> argparse.Namespace:
    base = dict(
        api_keys_file=None,
        jwt_jwks_file=None,
        jwt_issuer=None,
        jwt_audience=None,
        jwt_algorithms="RS256,ES256",
        auth_metrics=False,
    )
    return argparse.Namespace(**{**base, **overrides})


def _token(key: Any, *, kid: str = KID, algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, **claims}
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm, headers={"kid": kid}
    )


def _reason(auth: Authenticator, headers: dict[str, str]) -> str | None:
    try:
        auth.check(headers)
    except Unauthorized as exc:
        return exc.message
    return None


# In-process: the Authenticator itself ----------------------------------------------------------------
def test_off_unless_configured():
    auth = Authenticator(AuthConfig.from_args(_args(), environ={}))
    assert not auth.enabled
    assert not auth.required("/v2/models/m/infer")


def test_api_keys_from_env_and_file_with_rotation(tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfirst-key\n\n")
    auth = Authenticator(
        AuthConfig.from_args(_args(api_keys_file=str(keys)), environ={"EVLLM_API_KEYS": "a, b"})
    )
    assert auth.enabled
    for good in ("a", "b", "first-key"):
        assert _reason(auth, {"authorization": f"Bearer {good}"}) is None
        assert _reason(auth, {"x-api-key": good}) is None
    assert _reason(auth, {"authorization": "Bearer nope"}) == "invalid credentials"
    assert _reason(auth, {"authorization": "Bearer # comment"}) == "invalid credentials"
    assert "missing credentials" in _reason(auth, {})
    assert "Bearer" in _reason(auth, {"authorization": "Basic Zm9vOmJhcg=="})
    # A rotated Secret is picked up without a restart; the old key stops working.
    keys.write_text("second-key\n")
    os.utime(keys, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert _reason(auth, {"authorization": "Bearer second-key"}) is None
    assert _reason(auth, {"authorization": "Bearer first-key"}) == "invalid credentials"


def test_symmetric_and_none_algorithms_are_refused():
    with pytest.raises(ValueError, match="HS256"):
        AuthConfig.from_args(_args(jwt_algorithms="RS256,HS256"), environ={})
    with pytest.raises(ValueError, match="none"):
        AuthConfig.from_args(_args(jwt_algorithms="none"), environ={})


def test_open_paths_and_metrics_switch():
    auth = Authenticator(AuthConfig(api_keys=["k"]))
    for path in (
        "/",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/m/ready",
        "/v1/models/m",
        "/metrics",
    ):
        assert not auth.required(path), path
    for path in (
        "/v2",
        "/v2/models/m",
        "/v2/models/m/infer",
        "/v1/models/m:predict",
        "/openai/v1/models",
        "/events",
        "/openapi.json",
        "/v2/health/readyX",
    ):
        assert auth.required(path), path
    assert Authenticator(AuthConfig(api_keys=["k"], protect_metrics=True)).required("/metrics")


def test_jwt_validation(tmp_path: Path, rsa_key: Any):
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, rsa_key)
    auth = Authenticator(
        AuthConfig.from_args(
            _args(jwt_jwks_file=str(jwks), jwt_issuer=ISSUER, jwt_audience=AUDIENCE), environ={}
        )
    )
    assert _reason(auth, {"authorization": f"Bearer {_token(rsa_key)}"}) is None
    assert (
        _reason(auth, {"authorization": f"Bearer {_token(rsa_key, exp=int(time.time()) - 3600)}"})
        == "token expired"
    )
    assert (
        _reason(auth, {"authorization": f"Bearer {_token(rsa_key, aud='someone-else')}"})
        == "token has the wrong audience"
    )
    assert (
        _reason(auth, {"authorization": f"Bearer {_token(rsa_key, iss='https://evil.test')}"})
        == "token has the wrong issuer"
    )
    assert (
        _reason(auth, {"authorization": f"Bearer {_token(rsa_key, kid='other')}"})
        == "token signed with an unknown key"
    )
    assert "exp" in _reason(auth, {"authorization": f"Bearer {_token(rsa_key, exp=None)}"})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert _reason(auth, {"authorization": f"Bearer {_token(other)}"}) == "invalid token signature"
    # Algorithm confusion: an unsigned token, and an HMAC token keyed with the public key, are refused.
    unsigned = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
        None,
        algorithm="none",
        headers={"kid": KID},
    )
    assert _reason(auth, {"authorization": f"Bearer {unsigned}"}) is not None
    assert _reason(auth, {"authorization": "Bearer not.a.jwt"}) is not None


# Against the hardened server ------------------------------------------------------------------------
pytestmark_slow = pytest.mark.slow

OPEN = re.compile(
    r"^(/|/v2/health/live|/v2/health/ready|/v2/models/\{model_name\}/ready|/v1/models/\{model_name\}|/metrics)$"
)


def _routes(hardened) -> list[tuple[str, str]]:
    schema = httpx.get(hardened.url + "/openapi.json", headers=hardened.headers, timeout=30).json()
    routes = [(m.upper(), p) for p, item in schema["paths"].items() for m in item if m in ("get", "post")]
    return [*routes, ("POST", "/events")]


@pytestmark_slow
def test_every_route_needs_credentials(hardened):
    routes = _routes(hardened)
    assert len(routes) > 15 and ("POST", "/openai/v1/chat/completions") in routes
    for method, path in routes:
        url = hardened.url + path.replace("{model_name}", MODEL_NAME).replace("{model_version}", "1")
        r = httpx.request(method, url, json={}, timeout=30)
        if OPEN.match(path):
            assert r.status_code != 401, (method, path)
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"], (method, path)
        assert r.headers["www-authenticate"].startswith("Bearer")
        bad = httpx.request(method, url, json={}, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert bad.status_code == 401 and bad.json() == {"error": "invalid credentials"}


@pytestmark_slow
def test_env_key_file_key_and_jwt_are_accepted(hardened):
    body = {"text_input": "Hello", "parameters": {"max_tokens": 2}}
    url = f"{hardened.url}/v2/models/{MODEL_NAME}/generate"
    for headers in (
        {"Authorization": f"Bearer {ENV_KEY}"},
        {"X-API-Key": FILE_KEY},
        {"Authorization": f"Bearer {hardened.token()}"},
    ):
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["completion_tokens"] == 2
    expired = hardened.token(exp=int(time.time()) - 3600)
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {expired}"}, timeout=60)
    assert r.status_code == 401 and r.json() == {"error": "token expired"}
    # The OpenAI sub-app is behind the same gate.
    r = httpx.get(hardened.url + "/openai/v1/models", timeout=30)
    assert r.status_code == 401
    r = httpx.get(
        hardened.url + "/openai/v1/models",
        headers={"Authorization": f"Bearer {hardened.token()}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL_NAME
    # Probes and scrapes need nothing.
    assert httpx.get(hardened.url + "/v2/health/ready", timeout=10).status_code == 200
    assert "evllm_requests_total" in httpx.get(hardened.url + "/metrics", timeout=10).text
