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

import argparse
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Unauthorized

logger = logging.getLogger("evllm.auth")

API_KEYS_ENV = "EVLLM_API_KEYS"
API_KEYS_FILE_ENV = "EVLLM_API_KEYS_FILE"
DEFAULT_JWT_ALGORITHMS = "RS256,ES256,PS256,EdDSA"

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
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str | None = None
    jwt_jwks_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: list[str] = field(default_factory=lambda: DEFAULT_JWT_ALGORITHMS.split(","))
    protect_metrics: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> AuthConfig:
        env = os.environ if environ is None else environ
        keys = [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]
        algorithms = [a.strip() for a in args.jwt_algorithms.split(",") if a.strip()]
        # Public-key algorithms only: 'none' and HMAC would let a JWKS's public key act as a shared secret.
        unsafe = [a for a in algorithms if a.lower() == "none" or a.upper().startswith("HS")]
        if unsafe:
            raise ValueError(f"--jwt_algorithms: {', '.join(unsafe)} not allowed (use RS*, ES*, PS*, EdDSA)")
        return cls(
            api_keys=keys,
            api_keys_file=args.api_keys_file or env.get(API_KEYS_FILE_ENV) or None,
            jwt_jwks_file=args.jwt_jwks_file,
            jwt_issuer=args.jwt_issuer,
            jwt_audience=args.jwt_audience,
            jwt_algorithms=algorithms,
            protect_metrics=args.auth_metrics,
        )


class Authenticator:
    def __init__(self, config: AuthConfig):
        self.config = config
        self._static = [_digest(k) for k in config.api_keys]
        self._keys_file = _FileValue(config.api_keys_file, _parse_keys) if config.api_keys_file else None
        self._jwks = _FileValue(config.jwt_jwks_file, _parse_jwks) if config.jwt_jwks_file else None
        # Fail at startup, not on the first request, if a configured file is missing or malformed.
        if self._keys_file is not None:
            self._keys_file.get()
        if self._jwks is not None:
            self._jwks.get()

    @property
    def enabled(self) -> bool:
        return bool(self._static or self._keys_file or self._jwks)

    def required(self, path: str) -> bool:
        if not self.enabled or OPEN_PATHS.match(path):
            return False
        return path != "/metrics" or self.config.protect_metrics

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
            options = {"require": ["exp"], "verify_aud": self.config.jwt_audience is not None}
            if self.config.jwt_issuer is not None:
                options["require"].append("iss")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "auth",
        f"Authentication (off unless one is configured). API keys also come from ${API_KEYS_ENV} "
        "(comma-separated).",
    )
    group.add_argument(
        "--api_keys_file",
        default=None,
        help=f"File with one API key per line, e.g. a mounted Secret (also ${API_KEYS_FILE_ENV}).",
    )
    group.add_argument(
        "--jwt_jwks_file", default=None, help="JWKS file: accept JWT bearer tokens it verifies."
    )
    group.add_argument("--jwt_issuer", default=None, help="Required JWT issuer (iss).")
    group.add_argument("--jwt_audience", default=None, help="Required JWT audience (aud).")
    group.add_argument(
        "--jwt_algorithms",
        default=DEFAULT_JWT_ALGORITHMS,
        help=f"Accepted JWT signature algorithms (default {DEFAULT_JWT_ALGORITHMS}; never 'none' or HMAC).",
    )
    group.add_argument(
        "--auth_metrics", action="store_true", help="Require credentials on /metrics too (default: open)."
    )
