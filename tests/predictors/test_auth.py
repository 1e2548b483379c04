"""Auth: API keys (env + rotating Secret file) and JWT bearer tokens, on every route but health/readiness.

The Authenticator on its own, then the assembled server in-process (tests/inprocess.py) with its flags.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from eventing.extension import Eventing
from predictors.auth import AuthConfig, Authenticator
from predictors.errors import Unauthorized
from predictors.settings import SettingsError
from tests import inprocess
from tests.predictors.harness import (
    AUDIENCE,
    ISSUER,
    KID,
    MODEL_NAME,
    samples,
    token,
    total,
    write_jwks,
)

ENV_KEY = "env-key-0123456789"
FILE_KEY = "file-key-abcdefghij"


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EVLLM_API_KEYS", "EVLLM_API_KEYS_FILE", "EVLLM_JWT_ALGORITHMS", "EVLLM_AUTH_METRICS"):
        monkeypatch.delenv(name, raising=False)


def _reason(auth: Authenticator, headers: dict[str, str]) -> str | None:
    try:
        auth.check(headers)
    except Unauthorized as exc:
        return exc.message
    return None


def _auth(argv: list[str]) -> Authenticator:
    """The Authenticator exactly as `evllm serve` builds it from these flags and the environment."""
    return Authenticator(inprocess.settings(argv).auth)


# The Authenticator -----------------------------------------------------------------------------------
def test_off_unless_configured():
    auth = _auth([])
    assert not auth.enabled
    assert not auth.required("/v2/models/m/infer")
    assert not auth.required("/metrics")


def test_api_keys_from_env_and_file_with_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfirst-key\n\n")
    monkeypatch.setenv("EVLLM_API_KEYS", "a, b")
    auth = _auth(["--api_keys_file", str(keys)])
    assert auth.enabled
    for good in ("a", "b", "first-key"):
        assert _reason(auth, {"authorization": f"Bearer {good}"}) is None
        assert _reason(auth, {"x-api-key": good}) is None
    assert _reason(auth, {"authorization": "Bearer nope"}) == "invalid credentials"
    assert _reason(auth, {"authorization": "Bearer # comment"}) == "invalid credentials"
    assert _reason(auth, {"authorization": "Bearer a, b"}) == "invalid credentials"
    assert "missing credentials" in (_reason(auth, {}) or "")
    assert "missing credentials" in (_reason(auth, {"x-api-key": ""}) or "")
    assert "Bearer" in (_reason(auth, {"authorization": "Basic Zm9vOmJhcg=="}) or "")
    assert "Bearer" in (_reason(auth, {"authorization": "Bearer "}) or "")
    # A rotated Secret is picked up without a restart; the old key stops working.
    keys.write_text("second-key\n")
    os.utime(keys, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert _reason(auth, {"authorization": "Bearer second-key"}) is None
    assert _reason(auth, {"authorization": "Bearer first-key"}) == "invalid credentials"
    # While the Secret is swapped (file briefly missing) the env keys keep working.
    keys.unlink()
    assert _reason(auth, {"x-api-key": "a"}) is None
    assert _reason(auth, {"x-api-key": "second-key"}) == "invalid credentials"


def test_a_missing_keys_or_jwks_file_fails_at_startup_naming_the_flag(tmp_path: Path):
    # `evllm serve` turns SettingsError into one `evllm serve: error: ...` line and exit 2.
    with pytest.raises(SettingsError, match=r"^--api_keys_file .*missing: .*No such file"):
        Authenticator(AuthConfig(api_keys_file=str(tmp_path / "missing")))
    (tmp_path / "jwks.json").write_text("not a jwks")
    with pytest.raises(SettingsError, match=r"^--jwt_jwks_file .*jwks.json: "):
        Authenticator(AuthConfig(jwt_jwks_file=str(tmp_path / "jwks.json")))


def test_api_keys_are_environment_only(capsys: pytest.CaptureFixture[str]):
    # A flag would show in `ps`: there is none.
    with pytest.raises(SystemExit) as exc:
        inprocess.settings(["--api_keys", "k"])
    assert exc.value.code == 2 and "--api_keys" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--jwt_algorithms", "RS256,HS256"], None, "HS256 not allowed"),
        (["--jwt_algorithms", "none"], None, "none not allowed"),
        ([], "ES256,hs512", "hs512 not allowed"),
    ],
)
def test_symmetric_and_none_algorithms_are_refused(
    argv: list[str],
    env: str | None,
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    if env is not None:
        monkeypatch.setenv("EVLLM_JWT_ALGORITHMS", env)
    with pytest.raises(SystemExit) as exc:
        inprocess.settings(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "--jwt_algorithms" in err
    assert len(err.strip().splitlines()) == 1, err


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
        "/v2/models/m/versions/1/ready",
    ):
        assert auth.required(path), path
    assert Authenticator(AuthConfig(api_keys=["k"], auth_metrics=True)).required("/metrics")
    assert inprocess.settings(["--auth_metrics"]).auth.auth_metrics is True


def test_jwt_validation(tmp_path: Path, rsa_key: Any):
    jwks = write_jwks(tmp_path / "jwks.json", rsa_key)
    auth = _auth(["--jwt_jwks_file", str(jwks), "--jwt_issuer", ISSUER, "--jwt_audience", AUDIENCE])
    assert auth.enabled

    def reason(tok: str) -> str | None:
        return _reason(auth, {"authorization": f"Bearer {tok}"})

    assert reason(token(rsa_key)) is None
    assert reason(token(rsa_key, exp=int(time.time()) - 3600)) == "token expired"
    assert reason(token(rsa_key, aud="someone-else")) == "token has the wrong audience"
    assert reason(token(rsa_key, iss="https://evil.test")) == "token has the wrong issuer"
    assert reason(token(rsa_key, kid="other")) == "token signed with an unknown key"
    assert "exp" in (reason(token(rsa_key, exp=None)) or "")
    assert "iss" in (reason(token(rsa_key, iss=None)) or "")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert reason(token(other)) == "invalid token signature"
    # Algorithm confusion: an unsigned token, and an HMAC token keyed with the public key, are refused.
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": KID})
    assert reason(unsigned) is not None
    assert reason("not.a.jwt") is not None


# The assembled server, in-process --------------------------------------------------------------------
OPEN = re.compile(
    r"^(/|/v2/health/live|/v2/health/ready|/v2/models/\{model_name\}/ready|/v1/models/\{model_name\}|/metrics)$"
)


def test_every_route_needs_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EVLLM_API_KEYS", ENV_KEY)

    async def main() -> None:
        argv = ["--storage_roots", str(tmp_path)]
        async with inprocess.server(argv, extensions=[Eventing()]) as s, s.client() as c:
            assert (await c.get("/openapi.json")).status_code == 401
            schema = (await c.get("/openapi.json", headers={"x-api-key": ENV_KEY})).json()
            routes = [
                (m.upper(), p) for p, item in schema["paths"].items() for m in item if m in ("get", "post")
            ]
            routes += [("POST", "/events"), ("GET", "/openapi.json"), ("GET", "/openai/v1/models")]
            assert len(routes) > 15 and ("POST", "/openai/v1/chat/completions") in routes
            for method, path in routes:
                url = path.replace("{model_name}", MODEL_NAME).replace("{model_version}", "1")
                r = await c.request(method, url, json={})
                if OPEN.match(path):
                    assert r.status_code == 200, (method, path, r.status_code, r.text)
                    continue
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["error"].startswith("missing credentials"), (method, path)
                assert r.headers["www-authenticate"] == 'Bearer realm="evllm"'
                bad = await c.request(method, url, json={}, headers={"Authorization": "Bearer wrong"})
                assert bad.status_code == 401 and bad.json() == {"error": "invalid credentials"}
            # Refused before any work: nothing reached the engine or the OpenAI layer.
            assert s.engine.fake.requests == [] and s.openai.calls == []

    asyncio.run(main())


def test_env_key_file_key_and_jwt_are_accepted(tmp_path: Path, rsa_key: Any, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EVLLM_API_KEYS", ENV_KEY)
    (tmp_path / "api-keys").write_text(f"# rotated by the Secret\n{FILE_KEY}\n")
    jwks = write_jwks(tmp_path / "jwks.json", rsa_key)
    argv = [
        "--api_keys_file", str(tmp_path / "api-keys"),
        "--jwt_jwks_file", str(jwks),
        "--jwt_issuer", ISSUER,
        "--jwt_audience", AUDIENCE,
    ]  # fmt: skip

    async def main() -> None:
        async with inprocess.server(argv) as s, s.client() as c:
            body = {"text_input": "Hello", "parameters": {"max_tokens": 2}}
            url = f"/v2/models/{MODEL_NAME}/generate"
            for headers in (
                {"Authorization": f"Bearer {ENV_KEY}"},
                {"X-API-Key": FILE_KEY},
                {"Authorization": f"Bearer {token(rsa_key)}"},
            ):
                r = await c.post(url, json=body, headers=headers)
                assert r.status_code == 200, r.text
                assert r.json()["text_output"] == "HE"
            before = await c.get("/metrics")
            expired = token(rsa_key, exp=int(time.time()) - 3600)
            r = await c.post(url, json=body, headers={"Authorization": f"Bearer {expired}"})
            assert r.status_code == 401 and r.json() == {"error": "token expired"}
            # The OpenAI sub-app is behind the same gate.
            chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
            r = await c.post("/openai/v1/chat/completions", json=chat)
            assert r.status_code == 401 and s.openai.calls == []
            r = await c.post(
                "/openai/v1/chat/completions",
                json=chat,
                headers={"Authorization": f"Bearer {token(rsa_key)}"},
            )
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "HI"
            # Probes and scrapes need nothing; refusals are counted.
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).status_code == 200
            after = await c.get("/metrics")
            assert after.status_code == 200
            moved = total(
                samples(after.text), "evllm_requests_rejected_total", reason="unauthorized"
            ) - total(samples(before.text), "evllm_requests_rejected_total", reason="unauthorized")
            assert moved == 2
            # Only the three authenticated generations reached the engine.
            assert len(s.engine.fake.requests) == 3

    asyncio.run(main())


def test_auth_metrics_puts_metrics_behind_credentials(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EVLLM_API_KEYS", ENV_KEY)

    async def main() -> None:
        async with inprocess.server(["--auth_metrics"]) as s, s.client() as c:
            assert (await c.get("/metrics")).status_code == 401
            r = await c.get("/metrics", headers={"x-api-key": ENV_KEY})
            assert r.status_code == 200 and "evllm_requests_total" in r.text
            assert (await c.get("/v2/health/live")).status_code == 200

    asyncio.run(main())
