"""Browser tokens: what the publisher mints and the gateway verifies (JWT via PyJWT).

Claims::

    {"sub": "user-7", "name": "Alice", "projects": [1, 2], "aud": "eventbus", "iat": .., "exp": ..}

``projects`` is a list of project ids, or ``"*"`` for every project (for trusted tools only).
``sub`` identifies the person (several tabs with one ``sub`` are one presence member) and the
optional ``name`` is the display name presence shows (docs/presence.md).
Tokens are short-lived (15 minutes by default): the browser client re-asks its token function
before expiry and refreshes in-band, so a leaked token is worth little.

A process that verifies many tokens with one secret (the gateway) holds a :class:`TokenVerifier`;
:func:`verify_token` is the same check for a single token.
"""

from __future__ import annotations

import base64
import functools
import math
import operator
import re
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Literal

import jwt
import msgspec
from jwt.algorithms import HMACAlgorithm

__all__ = [
    "AUDIENCE",
    "DEFAULT_TOKEN_TTL",
    "MAX_NAME_LENGTH",
    "MAX_SUBJECT_BYTES",
    "InvalidSecret",
    "InvalidToken",
    "TokenClaims",
    "TokenVerifier",
    "is_text",
    "issue_token",
    "verify_token",
]

AUDIENCE = "eventbus"
#: Latest ``exp`` a token may carry: the largest integer a browser reads exactly (and far from
#: where a float, as the gateway's expiry timer computes, overflows).
MAX_EXP = 2**53 - 1
DEFAULT_TOKEN_TTL = timedelta(minutes=15)
ALLOWED_ALGORITHMS = ("HS256", "HS384", "HS512")
_HASHES = {
    "HS256": HMACAlgorithm.SHA256,
    "HS384": HMACAlgorithm.SHA384,
    "HS512": HMACAlgorithm.SHA512,
}
#: Longest display name (``name`` claim) a token may carry; longer ones are ignored on verify.
MAX_NAME_LENGTH = 200
#: Longest ``sub``, in UTF-8 bytes: the longest subject a revocation can name
#: (:mod:`schemas.revocations`, 1 to this many bytes). A longer one, an empty one, or one that is
#: not text (half a surrogate pair) could never be revoked, so ``issue_token`` refuses to mint it
#: and the gateway refuses a token that has one.
MAX_SUBJECT_BYTES = 1024


class TokenClaims(msgspec.Struct, frozen=True):
    """The verified content of a token."""

    projects: frozenset[int] | Literal["*"]
    exp: int
    sub: str | None = None
    #: Display name for presence; None when the token has none (or it is not a string).
    name: str | None = None
    #: When the token was issued (its verified ``iat``, unix seconds, a fraction rounded down);
    #: None when it has none or it is not a number. What a revocation compares
    #: (schemas.revocations: a token without one counts as issued at 0).
    iat: int | None = None

    def allows(self, project_id: int) -> bool:
        return self.projects == "*" or project_id in self.projects


class InvalidToken(ValueError):
    """A token that is malformed, wrongly signed, expired or not for this audience."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


class InvalidSecret(ValueError):
    """A secret that cannot sign or verify tokens: empty, or a key PyJWT refuses as an HMAC key
    (a PEM, SSH or DER key, a JWK: a public key is public, anyone could sign with it). The
    server's configuration is wrong: never an :class:`InvalidToken`, which is a client's."""


def issue_token(
    secret: str | bytes,
    projects: Iterable[int] | Literal["*"],
    *,
    ttl: timedelta | float = DEFAULT_TOKEN_TTL,
    subject: str | None = None,
    algorithm: str = "HS256",
    name: str | None = None,
) -> str:
    """Mint a token that lets a browser read the given projects for ``ttl``.

    The gateway verifies HS256 only (:func:`verify_token`'s default, and it has no setting to
    change that): ``algorithm="HS384"``/``"HS512"`` are for tools of your own that verify with
    ``verify_token(..., algorithms=[...])``.

    ``subject`` (the ``sub`` claim: who the person is, what a revocation names) is text of 1 to
    :data:`MAX_SUBJECT_BYTES` UTF-8 bytes. ``name`` is the person's display name shown by
    presence (at most :data:`MAX_NAME_LENGTH` characters); tokens without it stay valid.

    Raises :class:`InvalidSecret` (a ``ValueError``) for an empty secret or one that cannot be
    an HMAC key (a PEM or SSH key), ``ValueError`` for the other arguments.

    >>> token = issue_token("s3cret", projects=[1, 2], ttl=600, subject="user-7", name="Alice")
    """
    if isinstance(secret, str | bytes) and not secret:
        raise InvalidSecret("secret must not be empty")
    if algorithm not in ALLOWED_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALLOWED_ALGORITHMS}")
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    now = int(time.time())
    # NaN and infinity raised bare ValueError/OverflowError from round(); a huge finite ttl
    # made an exp that no browser reads exactly and verify_token refuses.
    if not 0 < seconds <= MAX_EXP - now:
        raise ValueError("ttl must be a positive, finite number of seconds")
    if projects != "*":
        # A str was iterated character by character ("12" granted projects 1 and 2), and
        # int() truncated floats (1.9 granted project 1): only integers are project ids.
        if isinstance(projects, str | bytes):
            raise ValueError(f"projects must be '*' or a list of project ids, got {projects!r}")
        projects = sorted({_project_id(p) for p in projects})
    claims: dict[str, object] = {
        "projects": projects,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + max(1, round(seconds)),
    }
    if subject is not None:
        if not is_text(subject):
            raise ValueError("subject must be a string (text: no lone UTF-16 surrogate)")
        unrevocable = _unrevocable(subject)
        if unrevocable is not None:
            raise ValueError(unrevocable)
        claims["sub"] = subject
    if name is not None:
        if not is_text(name) or not name or len(name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"name must be a string of 1 to {MAX_NAME_LENGTH} characters "
                "(text: no lone UTF-16 surrogate)"
            )
        claims["name"] = name
    try:
        return jwt.encode(claims, secret, algorithm=algorithm)
    except jwt.InvalidKeyError as exc:  # (PyJWT's own type, no ValueError: a traceback)
        raise InvalidSecret(f"the secret cannot sign tokens: {exc}") from None


def is_text(value: object) -> bool:
    """Whether ``value`` is a str that UTF-8 can carry. JSON's ``\\ud83d`` escape decodes to
    half a surrogate pair (a name a backend cut at a fixed length in UTF-16, as JavaScript's
    ``slice`` does, splitting an emoji): a Python str, but no frame or Redis command can carry
    it."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _project_id(value: object) -> int:
    """A project id given to :func:`issue_token`: an integer (``int``, or any type that is one
    exactly, such as numpy's, through ``__index__``), never a bool, a float or a str."""
    try:
        project = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        project = 0
    if isinstance(value, bool) or project <= 0:
        raise ValueError(f"project ids must be positive integers, got {value!r}")
    return project


def verify_token(
    token: str, secret: str | bytes, *, algorithms: Iterable[str] = ("HS256",), leeway: float = 5
) -> TokenClaims:
    """Check signature, audience and expiry; return the claims or raise :class:`InvalidToken`.

    ``algorithms``: among :data:`ALLOWED_ALGORITHMS`; a ``ValueError`` for any other, and
    :class:`InvalidSecret` for a secret that cannot be an HMAC key, never an InvalidToken: the
    server is misconfigured, not the client (the checks of :class:`TokenVerifier`, which this uses:
    the last few built are kept, so that a caller verifying many tokens with one secret does not
    prepare it each time)."""
    return _verifier(secret, tuple(algorithms), leeway).verify(token)


@functools.lru_cache(maxsize=8)
def _verifier(secret: str | bytes, algorithms: tuple[str, ...], leeway: float) -> TokenVerifier:
    return TokenVerifier(secret, algorithms=algorithms, leeway=leeway)


class _PreparedHMAC(HMACAlgorithm):
    """PyJWT's HMAC algorithm for one key, prepared once.

    PyJWT prepares the key given to ``decode`` on every call, and for an HMAC secret that means
    checking it is not a PEM, SSH or DER key nor a JWK (a DER parse and a JSON parse of the
    secret): a fifth of a token's verification, the same answer every time for one secret.
    Those checks run here, once, with PyJWT's own code; the token checks (allowed ``alg``, the
    signature, compared in constant time by PyJWT's ``verify``) run for every token as before.
    Any other key is prepared as PyJWT does."""

    def __init__(self, hash_alg, key: bytes) -> None:
        super().__init__(hash_alg)
        self._key = key
        self._prepared = super().prepare_key(key)
        self._key_length_warning = super().check_key_length(self._prepared)

    def prepare_key(self, key):  # type: ignore[no-untyped-def]  # PyJWT's signature
        return self._prepared if key is self._key else super().prepare_key(key)

    def check_key_length(self, key):  # type: ignore[no-untyped-def]
        if key is self._prepared:
            return self._key_length_warning
        return super().check_key_length(key)


#: A base64url segment as every issuer writes it: the URL-safe alphabet, no padding.
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9_-]*")


class _SegmentDecoder(jwt.PyJWS):
    """PyJWT's JWS decoder, whose check of each of a token's three base64url segments takes its
    common case at C speed.

    PyJWT checks every character of a segment against the alphabet in a Python generator, then
    decodes it and re-encodes the result to refuse non-canonical ones: over half of a token's
    verification (~116,000 instructions of ~296,000 for the generator alone, docs/benchmarks.md).
    Here a segment of the alphabet only, of a length base64 allows, is checked by a regular
    expression and the same decode and canonical re-encode; it is accepted only when those
    pass, exactly where PyJWT's own check accepts it. Anything else (padding, which some issuers
    add, a character outside the alphabet, a non-canonical encoding) goes to PyJWT's own
    method, which decides and words the error: its defences and their upstream fixes still
    apply to every segment this path does not accept. tests/test_tokens.py holds it to
    ``jwt.decode`` (a property test over tampered tokens) and checks that PyJWT still calls the
    method by this name (if it stopped, this would silently cost the old speed, nothing else)."""

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        if len(segment) % 4 != 1 and _PLAIN_SEGMENT.fullmatch(segment) is not None:
            decoded = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
            if base64.urlsafe_b64encode(decoded).rstrip(b"=") == segment:
                return decoded
        return jwt.PyJWS._decode_base64url_segment(segment, name)


class _Decoder(jwt.PyJWT):
    """PyJWT's decoder, with its options merged once and the JWS layer given (the prepared
    algorithms). PyJWT keeps the JWS decoder it uses in ``_jws`` (tests/test_tokens.py checks
    that verifying a token prepares no key, which would fail if that changed)."""

    def __init__(self, jws: jwt.PyJWS, options: dict) -> None:
        super().__init__(options)  # type: ignore[arg-type]
        self._jws = jws


class TokenVerifier:
    """Verifies tokens signed with one secret: :func:`verify_token` for a process that verifies
    many, with PyJWT's decoder, the allowed algorithms and the key prepared once.

    The checks are PyJWT's and the same for every token: the signature with an allowed
    algorithm only (``alg`` ``none`` or any other refused), the audience, ``exp`` (with
    ``leeway`` seconds of clock skew), ``iat``/``nbf`` when present, and the required claims;
    then the claims' own (``projects``, ``exp`` a browser reads exactly, ``sub`` and ``name``
    text). What is done once is what depends on the secret alone.

    Raises :class:`InvalidSecret` (a ``ValueError``) for an empty secret or one PyJWT refuses
    as an HMAC key (a PEM, SSH or DER key, a JWK: every token would be refused), ``ValueError``
    for an algorithm not in :data:`ALLOWED_ALGORITHMS`; ``TypeError`` for a secret that is
    neither str nor bytes (as PyJWT)."""

    def __init__(
        self,
        secret: str | bytes,
        *,
        algorithms: Iterable[str] = ("HS256",),
        leeway: float = 5,
    ) -> None:
        names = list(algorithms)
        unknown = [name for name in names if name not in _HASHES]
        if unknown or not names:
            raise ValueError(f"algorithms must be among {ALLOWED_ALGORITHMS}, got {names!r}")
        # As PyJWT takes a key: text as UTF-8, bytes as they are, anything else a TypeError.
        # bytes() took anything: an int n became n zero bytes, a key anyone could sign with.
        if isinstance(secret, str):
            key = secret.encode()
        elif isinstance(secret, bytes):
            key = bytes(secret)
        else:
            raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")
        jws = _SegmentDecoder(algorithms=[])
        try:
            for name in names:
                jws.register_algorithm(name, _PreparedHMAC(_HASHES[name], key))
        except jwt.InvalidKeyError as exc:
            raise InvalidSecret(f"the secret cannot verify tokens: {exc}") from None
        self._key = key
        self._algorithms = names
        self._leeway = leeway
        self._decoder = _Decoder(jws, {"require": ["exp", "projects"]})

    def verify(self, token: str) -> TokenClaims:
        """The claims of ``token``, or :class:`InvalidToken` (``expired`` set when only its
        ``exp`` is past)."""
        try:
            raw = self._decoder.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=AUDIENCE,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired", expired=True) from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token: {exc}") from None
        return _claims(raw)


#: Project sets of verified tokens, each kept once: the tokens of a project's viewers name the
#: same projects, and each connection holds its claims for its life (a frozenset is ~200 bytes
#: however small: a fifth of what a token adds to an idle connection, docs/benchmarks.md).
#: Bounded: small sets only, and emptied when full (a cache, never a registry).
_SHARED_PROJECT_SETS: dict[frozenset[int], frozenset[int]] = {}
_SHARED_MAX_SETS = 4096
_SHARED_MAX_PROJECTS = 16


def _shared(projects: frozenset[int]) -> frozenset[int]:
    """The one kept copy of ``projects`` (equal, immutable: interchangeable)."""
    if len(projects) > _SHARED_MAX_PROJECTS:
        return projects
    kept = _SHARED_PROJECT_SETS.get(projects)
    if kept is None:
        if len(_SHARED_PROJECT_SETS) >= _SHARED_MAX_SETS:
            _SHARED_PROJECT_SETS.clear()
        kept = _SHARED_PROJECT_SETS[projects] = projects
    return kept


_SUBJECT_TOO_LONG = (
    f"'sub' is longer than {MAX_SUBJECT_BYTES} UTF-8 bytes (no revocation could name it)"
)


_SUBJECT_EMPTY = "'sub' is empty (no revocation could name it)"

# Half a surrogate pair (JSON "\udc00", from a backend that cut a subject in UTF-16): no frame,
# Redis command or revocation can carry it. Taken as no subject, it made a token that revoking
# the person (by the subject the backend meant) never refused.
_SUBJECT_NOT_TEXT = (
    "'sub' is not text: it holds half a surrogate pair (no revocation could name it)"
)


def _unrevocable(subject: str) -> str | None:
    """Why no revocation could name ``subject`` (text): it is empty or over
    :data:`MAX_SUBJECT_BYTES` UTF-8 bytes (schemas.revocations takes 1 to that many); else None."""
    if not subject:
        return _SUBJECT_EMPTY
    # (A character is at most 4 bytes: most subjects are judged by their length alone.)
    if len(subject) > MAX_SUBJECT_BYTES // 4 and len(subject.encode()) > MAX_SUBJECT_BYTES:
        return _SUBJECT_TOO_LONG
    return None


def _claims(raw: dict) -> TokenClaims:
    """The claims of a token PyJWT has verified, or :class:`InvalidToken`."""
    projects = raw.get("projects")
    if projects == "*":
        allowed: frozenset[int] | Literal["*"] = "*"
    elif isinstance(projects, list) and all(
        isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in projects
    ):
        allowed = _shared(frozenset(projects))
    else:
        raise InvalidToken("invalid token: 'projects' must be a list of positive ids or '*'")
    if int(raw["exp"]) > MAX_EXP:  # PyJWT took any integer; the gateway's timer overflowed
        raise InvalidToken(f"invalid token: 'exp' is later than {MAX_EXP}")
    sub = raw.get("sub")
    name = raw.get("name")
    iat = raw.get("iat")
    if type(iat) is float and math.isfinite(iat):
        # A NumericDate may have a fraction: its whole second is what a revocation compares
        # (issued_before is whole seconds, so floor(iat) < issued_before iff iat < it). None
        # would count the token as issued at 0: refused after any revocation of its subject.
        iat = math.floor(iat)
    elif type(iat) is not int:  # a bool is no time, nor a string PyJWT's int() took
        iat = None
    if sub is not None:
        if not isinstance(sub, str):  # (PyJWT 2.10+ refuses it first)
            raise InvalidToken("invalid token: 'sub' must be a string")
        if not is_text(sub):
            raise InvalidToken(f"invalid token: {_SUBJECT_NOT_TEXT}")
        unrevocable = _unrevocable(sub)
        if unrevocable is not None:
            raise InvalidToken(f"invalid token: {unrevocable}")
    if not (is_text(name) and 0 < len(name) <= MAX_NAME_LENGTH):
        name = None  # a display name is decoration: a bad one is dropped, not a bad token
    return TokenClaims(
        projects=allowed,
        exp=int(raw["exp"]),
        sub=sub,
        name=name,
        iat=iat,
    )
