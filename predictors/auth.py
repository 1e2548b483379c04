"""Optional authentication: static API keys and/or JWT bearer tokens, checked on every route but health.

* API keys come from ``EVLLM_API_KEYS`` (comma-separated) and/or ``--api_keys_file`` (one per line, ``#``
  comments; a mounted Kubernetes Secret). The file is re-read when it changes, so rotating the Secret needs
  no restart. A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; comparison is
  constant-time (HMAC compare of SHA-256 digests, over every configured key).
* JWTs (``--jwt_jwks_file``, optionally ``--jwt_issuer`` / ``--jwt_audience``) are verified with PyJWT
  against the JWKS (signature, exp/nbf, iss, aud). Knative Eventing's OIDC tokens fit here.

Health, readiness and (unless ``--auth_metrics``) ``/metrics`` stay open so kubelets and Prometheus work.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Unauthorized
from .settings import SettingsError, setting

logger = logging.getLogger("evllm.auth")


# Probes must work without credentials: liveness, readiness (server and model), KServe's root liveness.
OPEN_PATHS = re.compile(r"^(/|/v2/health/live|/v2/health/ready|/v2/models/[^/]+/ready|/v1/models/[^/:]+)$")


def _digest(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hashlib.sha256(raw).digest()


class _FileValue:
    """A small file's parsed content, re-read when its mtime/size/inode changes (Secret rotation)."""

    def __init__(self, path: str, parse: Any):
        self.path, self.parse = path, parse
        self._stamp: tuple[int, int, int] | None = None
        self._value: Any = None

    def get(self) -> Any:
        st = os.stat(self.path)  # follows the ..data symlink a mounted Secret swaps
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._value = self.parse(Path(self.path).read_text())
            self._stamp = stamp
        return self._value


def _parse_keys(text: str) -> list[bytes]:
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_digest(line))
    return keys


@dataclass
class AuthConfig:
    api_keys: list[str] = setting(
        [], "API keys, comma-separated (environment only: a flag would show in `ps`).", flag=False
    )
    api_keys_file: str | None = setting(
        None, "File with one API key per line (# comments), e.g. a mounted Secret; re-read on change."
    )
    jwt_jwks_file: str | None = setting(None, "JWKS file: accept JWT bearer tokens it verifies.")
    jwt_issuer: str | None = setting(None, "Required JWT issuer (iss).")
    jwt_audience: str | None = setting(None, "Required JWT audience (aud).")
    jwt_algorithms: list[str] = setting(
        ["RS256", "ES256", "PS256", "EdDSA"], "Accepted JWT signature algorithms (never 'none' or HMAC)."
    )
    auth_metrics: bool = setting(False, "Require credentials on /metrics too.")

    def check(self) -> None:
        # Public-key algorithms only: 'none' and HMAC would let a JWKS's public key act as a shared secret.
        unsafe = [a for a in self.jwt_algorithms if a.lower() == "none" or a.upper().startswith("HS")]
        if unsafe:
            raise SettingsError(
                f"--jwt_algorithms: {', '.join(unsafe)} not allowed (use RS*, ES*, PS*, EdDSA)"
            )


class Authenticator:
    def __init__(self, config: AuthConfig):
        self.config = config
        self._static = [_digest(k) for k in config.api_keys]
        self._keys_file = _FileValue(config.api_keys_file, _parse_keys) if config.api_keys_file else None
        self._jwks = _FileValue(config.jwt_jwks_file, _parse_jwks) if config.jwt_jwks_file else None
        # Fail at startup, not on the first request, if a configured file is missing or malformed.
        for flag, value in (("--api_keys_file", self._keys_file), ("--jwt_jwks_file", self._jwks)):
            if value is None:
                continue
            try:
                value.get()
            except Exception as exc:  # missing, unreadable or malformed: the operator's to fix
                raise SettingsError(f"{flag} {value.path}: {exc}") from None

    @property
    def enabled(self) -> bool:
        return bool(self._static or self._keys_file or self._jwks)

    def required(self, path: str) -> bool:
        if not self.enabled or OPEN_PATHS.match(path):
            return False
        return path != "/metrics" or self.config.auth_metrics

    def _api_keys(self) -> list[bytes]:
        keys = list(self._static)
        if self._keys_file is not None:
            try:
                keys += self._keys_file.get()
            except OSError as exc:  # keep serving with the env keys during a Secret swap
                logger.warning("cannot read API keys file %s: %s", self.config.api_keys_file, exc)
        return keys

    def _key_matches(self, credential: str) -> bool:
        given = _digest(credential)
        ok = False
        for key in self._api_keys():
            # No short-circuit: the time taken does not depend on which key (if any) matched.
            ok |= hmac.compare_digest(given, key)
        return ok

    def _jwt_valid(self, token: str) -> str | None:
        """None when the token verifies; otherwise why not (for the 401 message)."""
        import jwt

        assert self._jwks is not None
        try:
            jwks = self._jwks.get()
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            candidates = [k for k in jwks.keys if kid is None or k.key_id == kid]
            if not candidates:
                return "token signed with an unknown key"
            required = ["exp"] if self.config.jwt_issuer is None else ["exp", "iss"]
            options: Any = {"require": required, "verify_aud": self.config.jwt_audience is not None}
            last = "invalid token"
            for key in candidates:
                try:
                    jwt.decode(
                        token,
                        key=key,
                        algorithms=self.config.jwt_algorithms,
                        audience=self.config.jwt_audience,
                        issuer=self.config.jwt_issuer,
                        options=options,
                        leeway=30,
                    )
                    return None
                except jwt.InvalidSignatureError:
                    last = "invalid token signature"
        except jwt.ExpiredSignatureError:
            return "token expired"
        except jwt.InvalidAudienceError:
            return "token has the wrong audience"
        except jwt.InvalidIssuerError:
            return "token has the wrong issuer"
        except jwt.PyJWTError as exc:
            return f"invalid token: {exc}"
        except OSError as exc:
            logger.warning("cannot read JWKS file %s: %s", self.config.jwt_jwks_file, exc)
            return "token cannot be verified now"
        return last

    def check(self, headers: dict[str, str]) -> None:
        """Raise Unauthorized unless the request carries a valid API key or JWT."""
        credential = headers.get("x-api-key")
        auth = headers.get("authorization")
        if credential is None and auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("Authorization header must be 'Bearer <token>'")
            credential = value.strip()
        if not credential:
            raise Unauthorized("missing credentials: send 'Authorization: Bearer <token>' or 'X-API-Key'")
        if self._key_matches(credential):
            return
        if self._jwks is not None and credential.count(".") == 2:
            reason = self._jwt_valid(credential)
            if reason is None:
                return
            raise Unauthorized(reason)
        raise Unauthorized("invalid credentials")


def _parse_jwks(text: str) -> Any:
    import jwt

    return jwt.PyJWKSet.from_json(text)
