"""Browser tokens: what backends mint (``publisher.issue_token``) and the gateway verifies."""

from __future__ import annotations

import time
import warnings
from datetime import timedelta
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher import issue_token as exported_issue_token
from schemas.tokens import (
    AUDIENCE,
    DEFAULT_TOKEN_TTL,
    MAX_NAME_LENGTH,
    MAX_SUBJECT_BYTES,
    InvalidSecret,
    InvalidToken,
    TokenClaims,
    TokenVerifier,
    _claims,
    issue_token,
    verify_token,
)

SECRET = "a-test-secret-long-enough-for-hs512-0123456789abcdef0123456789abcdef"


def forge(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    """A token with arbitrary claims, as a buggy or hostile issuer would make it."""
    base: dict[str, Any] = {"aud": AUDIENCE, "exp": int(time.time()) + 60}
    return jwt.encode({**base, **claims}, secret, algorithm=algorithm)


def test_publisher_exports_the_same_issue_token() -> None:
    assert exported_issue_token is issue_token


def test_round_trip() -> None:
    token = issue_token(SECRET, projects=[2, 1, 2], ttl=600, subject="user-7")
    claims = verify_token(token, SECRET)
    assert claims.projects == frozenset({1, 2})
    assert claims.sub == "user-7"
    assert claims.allows(1) and claims.allows(2)
    assert not claims.allows(3)
    assert abs(claims.exp - (time.time() + 600)) <= 2


def test_claims_on_the_wire() -> None:
    token = issue_token(SECRET, projects=[3, 1], ttl=timedelta(minutes=2), subject="s")
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert raw["projects"] == [1, 3]
    assert raw["aud"] == AUDIENCE
    assert raw["sub"] == "s"
    assert raw["exp"] - raw["iat"] == 120
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_default_ttl_is_short() -> None:
    raw = jwt.decode(
        issue_token(SECRET, projects=[1]), SECRET, algorithms=["HS256"], audience=AUDIENCE
    )
    assert raw["exp"] - raw["iat"] == DEFAULT_TOKEN_TTL.total_seconds() == 900
    assert "sub" not in raw
    assert verify_token(issue_token(SECRET, projects=[1]), SECRET).sub is None


def test_bytes_secret() -> None:
    token = issue_token(SECRET.encode(), projects=[1])
    assert verify_token(token, SECRET.encode()).projects == frozenset({1})


def test_star_allows_every_project() -> None:
    claims = verify_token(issue_token(SECRET, projects="*"), SECRET)
    assert claims.projects == "*"
    assert claims.allows(1) and claims.allows(10**9)


def test_empty_projects_allow_nothing() -> None:
    claims = verify_token(issue_token(SECRET, projects=[]), SECRET)
    assert claims.projects == frozenset()
    assert not claims.allows(1)


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms_verify_when_allowed(algorithm: str) -> None:
    token = issue_token(SECRET, projects=[1], algorithm=algorithm)
    with pytest.raises(InvalidToken):
        verify_token(token, SECRET)  # only HS256 by default
    assert verify_token(token, SECRET, algorithms=[algorithm]).allows(1)


def test_the_gateway_verifies_hs256_only_as_the_docs_say() -> None:
    """docs/publisher.md once offered HS384/HS512 "when the gateways are configured for it":
    there is no such setting, and the gateway verifies with verify_token's default (HS256)."""
    import inspect
    from pathlib import Path

    from gateway.config import GatewayConfig
    from gateway.server import Gateway

    assert not [name for name in GatewayConfig.__struct_fields__ if "alg" in name]
    assert "TokenVerifier(config.auth_secret)" in inspect.getsource(Gateway.__init__)
    assert inspect.signature(TokenVerifier).parameters["algorithms"].default == ("HS256",)
    assert inspect.signature(verify_token).parameters["algorithms"].default == ("HS256",)
    docs = (Path(__file__).parents[1] / "docs" / "publisher.md").read_text()
    assert "configured for it" not in docs
    assert "HS256, the only algorithm the gateway accepts" in docs


def test_expired() -> None:
    token = forge({"projects": [1], "exp": int(time.time()) - 60})
    with pytest.raises(InvalidToken, match="expired") as info:
        verify_token(token, SECRET)
    assert info.value.expired is True


def test_leeway_tolerates_small_clock_skew() -> None:
    token = forge({"projects": [1], "exp": int(time.time()) - 2})
    assert verify_token(token, SECRET, leeway=5).allows(1)
    with pytest.raises(InvalidToken) as info:
        verify_token(token, SECRET, leeway=0)
    assert info.value.expired


def test_wrong_secret() -> None:
    token = issue_token(SECRET, projects=[1])
    with pytest.raises(InvalidToken, match="invalid token") as info:
        verify_token(token, "another-secret-long-enough-for-hs256-0123456789")
    assert info.value.expired is False


@pytest.mark.parametrize("audience", ["other-service", None])
def test_wrong_or_missing_audience(audience: str | None) -> None:
    claims: dict[str, Any] = {"projects": [1], "aud": audience}
    token = (
        forge(claims)
        if audience
        else jwt.encode({"projects": [1], "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    )
    with pytest.raises(InvalidToken, match="invalid token"):
        verify_token(token, SECRET)


def test_unsigned_token_is_refused() -> None:
    token = jwt.encode(
        {"projects": [1], "aud": AUDIENCE, "exp": int(time.time()) + 60}, None, algorithm="none"
    )
    with pytest.raises(InvalidToken):
        verify_token(token, SECRET)


@pytest.mark.parametrize(
    "token", ["", "garbage", "a.b.c", "a.b", "eyJhbGciOiJIUzI1NiJ9.e30.", "\x00" * 10]
)
def test_malformed(token: str) -> None:
    with pytest.raises(InvalidToken, match="invalid token"):
        verify_token(token, SECRET)


def test_tampered_payload() -> None:
    token = issue_token(SECRET, projects=[1])
    header, _payload, signature = token.split(".")
    other_payload = issue_token(SECRET, projects=[1, 2, 3]).split(".")[1]
    with pytest.raises(InvalidToken):
        verify_token(f"{header}.{other_payload}.{signature}", SECRET)


@pytest.mark.parametrize(
    "projects",
    [[0], [-1], ["1"], [1.0], [True], "all", {"1": True}, None, 1, [[1]]],
)
def test_bad_projects_claim(projects: Any) -> None:
    with pytest.raises(InvalidToken, match="projects"):
        verify_token(forge({"projects": projects}), SECRET)


@pytest.mark.parametrize("missing", ["projects", "exp"])
def test_required_claims(missing: str) -> None:
    claims: dict[str, Any] = {"projects": [1], "aud": AUDIENCE, "exp": int(time.time()) + 60}
    del claims[missing]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(InvalidToken, match=missing):
        verify_token(token, SECRET)


def test_non_string_subject_is_ignored() -> None:
    # PyJWT itself rejects a non-string "sub"; either way the gateway never sees a non-str.
    try:
        claims = verify_token(forge({"projects": [1], "sub": 7}), SECRET)
    except InvalidToken:
        return
    assert claims.sub is None


def test_project_ids_of_integer_types_other_than_int_are_taken() -> None:
    """What ``int()`` used to accept exactly (an integer type with ``__index__``, such as numpy's
    or a database driver's) is still a project id; only inexact values are refused."""

    class Integer:
        def __init__(self, value: int) -> None:
            self.value = value

        def __index__(self) -> int:
            return self.value

    claims = verify_token(issue_token(SECRET, [Integer(3), 4]), SECRET)
    assert claims.projects == frozenset({3, 4})


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("", [1]), {}, "secret"),
        ((b"", [1]), {}, "secret"),
        ((SECRET, [1]), {"ttl": 0}, "ttl"),
        ((SECRET, [1]), {"ttl": -5}, "ttl"),
        ((SECRET, [1]), {"ttl": timedelta(seconds=-1)}, "ttl"),
        ((SECRET, [0]), {}, "positive"),
        ((SECRET, [1, -2]), {}, "positive"),
        ((SECRET, [1]), {"algorithm": "none"}, "algorithm"),
        ((SECRET, [1]), {"algorithm": "RS256"}, "algorithm"),
        ((SECRET, ["x"]), {}, "positive integers"),
        ((SECRET, "12"), {}, "projects must be"),  # was projects 1 and 2
        ((SECRET, b"12"), {}, "projects must be"),
        ((SECRET, [1.9]), {}, "positive integers"),  # was project 1
        ((SECRET, [True]), {}, "positive integers"),
        ((SECRET, [1]), {"ttl": float("inf")}, "ttl"),  # was OverflowError
        ((SECRET, [1]), {"ttl": float("nan")}, "ttl"),
        ((SECRET, [1]), {"ttl": 1e300}, "ttl"),  # was an exp of 301 digits
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        issue_token(*args, **kwargs)


@pytest.mark.parametrize("exp", [2**53, 10**400])
def test_an_exp_beyond_what_a_browser_reads_exactly_is_refused(exp: int) -> None:
    """PyJWT takes any integer exp; the gateway's expiry timer (exp - time.time()) raised
    OverflowError for one beyond a float, and a browser misreads any beyond 2**53 - 1."""
    with pytest.raises(InvalidToken, match="exp"):
        verify_token(forge({"projects": [1], "exp": exp}), SECRET)
    assert verify_token(forge({"projects": [1], "exp": 2**53 - 1}), SECRET).exp == 2**53 - 1


def test_claims_struct() -> None:
    claims = TokenClaims(projects=frozenset({5}), exp=1, sub=None)
    assert claims.allows(5) and not claims.allows(6)
    with pytest.raises(AttributeError):
        claims.exp = 2  # type: ignore[misc]  # frozen


def test_display_name_round_trip() -> None:
    token = issue_token(SECRET, projects=[1], subject="user-7", name="Alice")
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert raw["name"] == "Alice"
    assert verify_token(token, SECRET).name == "Alice"


def test_tokens_without_a_name_still_verify() -> None:
    # Tokens minted before the claim existed (and by issuers that never set it).
    assert "name" not in jwt.decode(
        issue_token(SECRET, projects=[1]), SECRET, algorithms=["HS256"], audience=AUDIENCE
    )
    assert verify_token(issue_token(SECRET, projects=[1]), SECRET).name is None
    assert TokenClaims(projects=frozenset({1}), exp=1).name is None


@pytest.mark.parametrize(
    "name", [7, "", "x" * (MAX_NAME_LENGTH + 1), ["Alice"], {"a": [[{}]]}, None, "Alice \ud83d"]
)
def test_a_bad_display_name_is_dropped_not_fatal(name: object) -> None:
    claims = verify_token(forge({"projects": [1], "sub": "u", "name": name}), SECRET)
    assert claims.name is None
    assert claims.sub == "u" and claims.allows(1)


@pytest.mark.parametrize("name", ["", "x" * (MAX_NAME_LENGTH + 1), "Alice \ud83d"])
def test_issue_refuses_a_bad_display_name(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        issue_token(SECRET, projects=[1], name=name)


@pytest.mark.parametrize("sub", ["user-7 \udc00", "\ud83d"])
def test_a_subject_that_is_not_text_is_refused_on_both_sides(sub: str) -> None:
    """Half a surrogate pair (JSON ``\\udc00``) decodes to a str no frame, Redis command or
    revocation can carry. Such a token was taken with no subject: revoking the person (by the
    subject the backend meant, or any) never refused it. It is refused, as an empty or too long
    subject is (and a subject that is not a string, which PyJWT refuses), and not minted."""
    for verify in (lambda t: verify_token(t, SECRET), TokenVerifier(SECRET).verify):
        with pytest.raises(InvalidToken, match="'sub' is not text"):
            verify(forge({"projects": [1], "sub": sub}))
    with pytest.raises(InvalidToken, match="Subject must be a string"):
        verify_token(forge({"projects": [1], "sub": 7}), SECRET)
    with pytest.raises(ValueError, match="subject"):
        issue_token(SECRET, projects=[1], subject=sub)


def test_a_verifier_prepares_its_secret_once_not_per_token(monkeypatch) -> None:
    """PyJWT prepares the key given to decode on every call (for an HMAC secret: checks that it
    is no PEM, SSH or DER key nor a JWK, a fifth of a verification). The gateway verified every
    token with ``verify_token``, so each one paid for those checks again; a verifier runs them
    once (they depend on the secret alone), and verify_token keeps the verifier of a secret."""
    from jwt.algorithms import HMACAlgorithm

    prepared: list[bytes] = []
    original = HMACAlgorithm.prepare_key

    def counting(self, key):  # type: ignore[no-untyped-def]
        prepared.append(key)
        return original(self, key)

    monkeypatch.setattr(HMACAlgorithm, "prepare_key", counting)
    secret = SECRET + "-prepared-once"
    tokens = [issue_token(secret, projects=[n], subject=f"user-{n}") for n in range(1, 6)]
    prepared.clear()
    verifier = TokenVerifier(secret)
    assert len(prepared) == 1  # the secret's checks, at construction
    assert [verifier.verify(token).projects for token in tokens] == [
        frozenset({n}) for n in range(1, 6)
    ]
    assert len(prepared) == 1
    for token in tokens:
        assert verify_token(token, secret).allows(int(verify_token(token, secret).sub[5:]))
    assert len(prepared) == 2  # verify_token's own verifier, built for the first token


def test_a_verifier_checks_what_verify_token_checks() -> None:
    verifier = TokenVerifier(SECRET)
    good = issue_token(SECRET, projects=[1, 2], subject="user-7", name="Alice")
    assert verifier.verify(good) == verify_token(good, SECRET)
    bad = [
        issue_token(SECRET, projects=[1], algorithm="HS512"),  # an algorithm not allowed
        issue_token("another-secret-long-enough-for-hs256-0123456789", projects=[1]),
        forge({"projects": [1], "aud": "other"}),
        forge({"projects": [0]}),
        jwt.encode({"projects": [1], "aud": AUDIENCE, "exp": 2**40}, None, algorithm="none"),
        "garbage",
    ]
    for token in bad:
        with pytest.raises(InvalidToken):
            verifier.verify(token)
    with pytest.raises(InvalidToken) as info:
        verifier.verify(forge({"projects": [1], "exp": int(time.time()) - 60}))
    assert info.value.expired
    assert TokenVerifier(SECRET, algorithms=["HS512"]).verify(bad[0]).allows(1)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("", "HMAC key must not be empty"),
        ("-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----", "asymmetric key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "asymmetric key"),
        ('{"kty": "oct", "k": "c2VjcmV0"}', "JWK"),
    ],
)
def test_a_secret_that_cannot_be_an_hmac_key_is_refused_at_once(secret: str, message: str) -> None:
    """Such a secret used to start a gateway that refused every token ("invalid token: The
    specified key is an asymmetric key"): now the gateway refuses the setting at startup. It is
    an InvalidSecret everywhere (the server's mistake), never an InvalidToken (a client's), and
    issue_token raised PyJWT's own InvalidKeyError, no ValueError: the CLI's traceback."""
    from gateway.config import ConfigError, GatewayConfig

    with pytest.raises(InvalidSecret, match=message) as refused:
        TokenVerifier(secret)
    assert not isinstance(refused.value, InvalidToken)
    with pytest.raises(InvalidSecret, match=message) as refused:
        verify_token(issue_token(SECRET, projects=[1]), secret)
    assert not isinstance(refused.value, InvalidToken)
    with pytest.raises(InvalidSecret, match="empty" if not secret else message):
        issue_token(secret, projects=[1])
    if secret:  # (an empty one is refused by name: "an auth secret is required")
        with pytest.raises(ConfigError, match=f"EVENTBUS_AUTH_SECRET: .*{message}"):
            GatewayConfig(auth_secret=secret)


@pytest.mark.parametrize("algorithms", [["RS256"], ["none"], [], ["HS256", "ES256"]])
def test_a_verifier_takes_hmac_algorithms_only(algorithms: list[str]) -> None:
    with pytest.raises(ValueError, match="algorithms"):
        TokenVerifier(SECRET, algorithms=algorithms)


@pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning")  # (the forger's short key)
@pytest.mark.parametrize("secret", [32, 8, True, memoryview(b"a-secret"), bytearray(b"a-secret")])
def test_a_secret_that_is_neither_text_nor_bytes_is_refused(secret: object) -> None:
    """PyJWT refuses such a key (TypeError); the verifier made bytes of it instead, and
    ``bytes(32)`` is 32 zero bytes: a token anyone signed with them was accepted (``projects``
    ``"*"`` included), where ``jwt.decode`` refused it."""
    forged_key = secret if not isinstance(secret, int) else bytes(secret)
    token = jwt.encode(
        {"projects": "*", "aud": AUDIENCE, "exp": int(time.time()) + 60},
        bytes(forged_key),  # type: ignore[arg-type]
        algorithm="HS256",
    )
    with pytest.raises(TypeError):
        jwt.decode(token, secret, algorithms=["HS256"], audience=AUDIENCE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TokenVerifier(secret)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify_token(token, secret)  # type: ignore[arg-type]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)
_NOW = int(time.time())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret=st.one_of(
        st.sampled_from([SECRET, "k"]),
        st.text(min_size=1, max_size=8),
        st.binary(min_size=1, max_size=8),
    ),
    signer=st.one_of(st.none(), st.sampled_from([SECRET, b"k", "other"])),
    alg=st.sampled_from(["HS256", "HS384", "HS512", "none", "RS256", "hs256", "", None, 7]),
    allowed=st.lists(
        st.sampled_from(["HS256", "HS384", "HS512"]), min_size=1, max_size=3, unique=True
    ),
    header=st.dictionaries(
        st.sampled_from(["kid", "typ", "crit", "b64", "jwk"]), _JSON, max_size=1
    ),
    changes=st.fixed_dictionaries(
        {},
        optional={
            "projects": st.one_of(st.just("*"), st.lists(st.integers(-1, 3), max_size=2), _JSON),
            "aud": st.one_of(st.lists(st.sampled_from([AUDIENCE, "x"])), _JSON),
            "exp": st.one_of(st.integers(_NOW - 20, _NOW + 99), _JSON),
            "iat": st.one_of(st.integers(_NOW - 20, _NOW + 99), _JSON),
            "nbf": st.one_of(st.integers(_NOW - 20, _NOW + 99), _JSON),
            "sub": _JSON,
        },
    ),
    tamper=st.sampled_from(["", "signature", "padding", "no signature"]),
)
def test_a_verifier_accepts_exactly_what_pyjwt_decode_accepts(
    secret: str | bytes,
    signer: str | bytes | None,
    alg: object,
    allowed: list[str],
    header: dict[str, Any],
    changes: dict[str, Any],
    tamper: str,
) -> None:
    """The verifier prepares PyJWT's key once and hands PyJWT its own JWS layer: with
    ``jwt.decode`` as the oracle, no token (any header, ``alg``, claims, signing key, tampered
    signature) is accepted by one and refused by the other, and the claims are the same."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    # A valid token's claims, some changed: a JSON null stands for a claim left out.
    valid = {"projects": [1], "aud": AUDIENCE, "exp": _NOW + 60}
    claims = {name: value for name, value in {**valid, **changes}.items() if value is not None}
    key = secret if signer is None else signer
    key_bytes = key.encode() if isinstance(key, str) else key
    signing_input = (
        f"{b64(json.dumps({'alg': alg, **header}).encode())}.{b64(json.dumps(claims).encode())}"
    )
    digest = {"HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(str(alg), hashlib.sha256)
    signature = b64(hmac.new(key_bytes, signing_input.encode(), digest).digest())
    signature = {
        "signature": ("A" if signature[0] != "A" else "B") + signature[1:],
        "padding": signature + "=",
        "no signature": "",
    }.get(tamper, signature)
    token = f"{signing_input}.{signature}"

    def outcome(verify: Any) -> object:
        try:
            return verify()
        except InvalidToken as exc:
            return ("refused", exc.expired)
        except jwt.ExpiredSignatureError:
            return ("refused", True)
        except jwt.PyJWTError:
            return ("refused", False)

    def oracle() -> TokenClaims:
        return _claims(
            jwt.decode(
                token,
                secret,
                algorithms=allowed,
                audience=AUDIENCE,
                leeway=5,
                options={"require": ["exp", "projects"]},
            )
        )

    try:
        verifier = TokenVerifier(secret, algorithms=allowed)
    except ValueError:  # a secret PyJWT refuses as an HMAC key: it refuses every token
        assert outcome(oracle) == ("refused", False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT's warning about short keys
        assert outcome(lambda: verifier.verify(token)) == outcome(oracle)


_SEGMENT_BYTES = st.one_of(
    st.binary(max_size=12),
    st.text(
        alphabet=st.sampled_from(
            list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") * 4
            + list("=+/!. \n\u00e9")
        ),
        max_size=24,
    ).map(str.encode),
)


@settings(max_examples=2000, deadline=None)
@given(segment=_SEGMENT_BYTES)
def test_a_token_segment_is_decoded_exactly_as_pyjwt_decodes_it(segment: bytes) -> None:
    """The verifier checks a base64url segment of the alphabet alone with a regular expression
    (PyJWT's own check is a Python generator over every character, over half of a
    verification): for any bytes, padded, non-canonical or junk included, it gives the same
    bytes as PyJWT's check, or refuses it with PyJWT's own error."""
    from schemas.tokens import _SegmentDecoder

    def outcome(decode: Any) -> object:
        try:
            return decode(segment, "payload")
        except jwt.DecodeError as exc:
            return ("refused", str(exc))

    expected = outcome(jwt.PyJWS._decode_base64url_segment)
    assert outcome(_SegmentDecoder._decode_base64url_segment) == expected


def test_the_verifier_decodes_each_segment_with_its_own_check(monkeypatch) -> None:
    """PyJWT calls the segment check by a private name; if a release renamed it, the verifier
    would still be right (PyJWT's own check would run) but a third slower, silently. This
    notices: a token's three segments go through the verifier's check."""
    import schemas.tokens as tokens

    calls = []
    original = tokens._SegmentDecoder._decode_base64url_segment

    def counted(segment: bytes, name: str) -> bytes:
        calls.append(name)
        return original(segment, name)

    monkeypatch.setattr(tokens._SegmentDecoder, "_decode_base64url_segment", staticmethod(counted))
    verifier = TokenVerifier(SECRET)
    verifier.verify(issue_token(SECRET, projects=[1], subject="user-7"))
    assert calls == ["header", "payload", "crypto"]


def test_tokens_naming_the_same_projects_share_one_set_and_the_sharing_is_bounded() -> None:
    """Every connection keeps its claims for its life: the tokens of one project's viewers
    share one frozenset (~0.2 KiB less per connection), a cache bounded in sets and in size."""
    from schemas import tokens

    first = verify_token(issue_token(SECRET, [3, 1], subject="a"), SECRET)
    second = verify_token(issue_token(SECRET, [1, 3], subject="b"), SECRET)
    assert first.projects == frozenset({1, 3}) and first.projects is second.projects
    many = list(range(1, tokens._SHARED_MAX_PROJECTS + 2))
    big = [verify_token(issue_token(SECRET, many), SECRET).projects for _ in range(2)]
    assert big[0] == big[1] and big[0] is not big[1]  # a large set is never kept
    for project in range(1, tokens._SHARED_MAX_SETS + 10):
        tokens._shared(frozenset({project}))
    assert len(tokens._SHARED_PROJECT_SETS) <= tokens._SHARED_MAX_SETS


def test_a_subject_too_long_to_revoke_is_refused_on_both_sides() -> None:
    """A revocation names a subject of at most 1,024 UTF-8 bytes (schemas.revocations): a token
    with a longer ``sub`` could never be revoked, so it is not minted, nor taken."""
    longest = "é" * (MAX_SUBJECT_BYTES // 2)  # 1,024 bytes in 512 characters
    assert verify_token(issue_token(SECRET, [1], subject=longest), SECRET).sub == longest
    with pytest.raises(ValueError, match="1024 UTF-8 bytes"):
        issue_token(SECRET, [1], subject=longest + "x")
    with pytest.raises(InvalidToken, match="1024 UTF-8 bytes"):
        verify_token(forge({"projects": [1], "sub": longest + "x"}), SECRET)
    with pytest.raises(InvalidToken, match="1024 UTF-8 bytes"):
        TokenVerifier(SECRET).verify(forge({"projects": [1], "sub": "u" * 5000}))


def test_an_empty_subject_is_refused_on_both_sides() -> None:
    """A revocation names a subject of 1 to 1,024 UTF-8 bytes: a token whose ``sub`` is the
    empty string could never be revoked (``revoke_tokens("")`` is refused), so it is not
    minted, nor taken, as a too long one is not."""
    with pytest.raises(ValueError, match="empty"):
        issue_token(SECRET, [1], subject="")
    with pytest.raises(InvalidToken, match="empty"):
        verify_token(forge({"projects": [1], "sub": ""}), SECRET)
    with pytest.raises(InvalidToken, match="empty"):
        TokenVerifier(SECRET).verify(forge({"projects": [1], "sub": ""}))
    # The shortest a revocation can name is taken.
    assert verify_token(issue_token(SECRET, [1], subject="u"), SECRET).sub == "u"
