"""``python -m publisher.http_api``: serve the HTTP API, make an API key, print its OpenAPI.

python -m publisher.http_api new-key --id billing --projects 1,2   # prints the key and its entry
python -m publisher.http_api new-key --id accounts --may-revoke   # only revokes tokens
python -m publisher.http_api serve --keys-file keys.json --port 8766
python -m publisher.http_api openapi > openapi.json   # the API's OpenAPI 3.1 document
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import msgspec

from publisher.http_api.app import HttpApiSettings, PublishApi
from publisher.http_api.core import ApiKey, Credentials, hash_key, new_key
from schemas.revocations import DEFAULT_MAX_REVOCATIONS
from serverkit.logs import add_log_arguments, configure_logging, log_arguments_error

__all__ = ["main"]


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP publish API")
    serve.add_argument(
        "--redis-url",
        default=os.environ.get("EVENTBUS_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"default $EVENTBUS_REDIS_URL, else {DEFAULT_REDIS_URL}",
    )
    serve.add_argument(
        "--prefix",
        default=os.environ.get("EVENTBUS_PREFIX", "eventbus"),
        help="key prefix shared with the gateways (default $EVENTBUS_PREFIX, else eventbus)",
    )
    serve.add_argument(
        "--max-revocations",
        type=int,
        default=os.environ.get("EVENTBUS_MAX_REVOCATIONS", str(DEFAULT_MAX_REVOCATIONS)),
        help="the cap of the token revocation list: POST /v1/revocations of a new subject "
        "beyond it is 507 revocation_list_full (default $EVENTBUS_MAX_REVOCATIONS, else "
        f"{DEFAULT_MAX_REVOCATIONS})",
    )
    serve.add_argument(
        "--keys-file",
        default=os.environ.get("EVENTBUS_PUBLISH_KEYS_FILE"),
        help="JSON file of API keys (hashes); env EVENTBUS_PUBLISH_KEYS_FILE",
    )
    serve.add_argument(
        "--host",
        default=os.environ.get("EVENTBUS_HTTP_API_HOST", "127.0.0.1"),
        help="default $EVENTBUS_HTTP_API_HOST, else 127.0.0.1",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("EVENTBUS_HTTP_API_PORT", "8766")),
        help="default $EVENTBUS_HTTP_API_PORT, else 8766",
    )
    _add_settings(serve)
    add_log_arguments(serve)
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        default=1000,
        help="requests in progress at once, more get 503 (uvicorn); connections past it and "
        "64 more are closed at accept",
    )

    document = commands.add_parser(
        "openapi",
        help="print the API's OpenAPI 3.1 document (docs/openapi.json); the limits it states are "
        "those of the settings given, as for serve",
    )
    _add_settings(document)

    key = commands.add_parser("new-key", help="print a new API key and its keys-file entry")
    key.add_argument("--id", required=True, help="a name for the credential (e.g. the service)")
    key.add_argument(
        "--projects",
        default=None,
        help="comma-separated project ids, or '*' (required unless --may-revoke: a key that "
        "only revokes publishes nowhere)",
    )
    key.add_argument(
        "--rate", type=float, default=None, help="events/s for this key (default: serve's --rate)"
    )
    key.add_argument(
        "--burst", type=int, default=None, help="events this key may save up (serve's --burst)"
    )
    key.add_argument(
        "--may-revoke",
        action="store_true",
        help="the key may also revoke any subject's tokens (POST /v1/revocations)",
    )
    return parser


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """A flag for each of :class:`HttpApiSettings`."""
    defaults = HttpApiSettings()
    for field in msgspec.structs.fields(HttpApiSettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(field.default),
            default=getattr(defaults, field.name),
            help="default %(default)s (docs/http-publish.md)",
        )


def _settings(args: argparse.Namespace) -> HttpApiSettings:
    """The settings of the flags; ValueError naming the flag of one that cannot work."""
    return HttpApiSettings(
        **{f.name: getattr(args, f.name) for f in msgspec.structs.fields(HttpApiSettings)}
    )


def main(argv: list[str] | None = None, *, prog: str = "python -m publisher.http_api") -> int:
    args = _parser(prog).parse_args(argv)
    if args.command == "new-key":
        return _new_key(args, prog)
    if args.command == "openapi":
        return _openapi(args, prog)
    return _serve(args, prog)


def _openapi(args: argparse.Namespace, prog: str) -> int:
    from publisher.http_api.openapi import openapi_json

    try:
        settings = _settings(args)
    except ValueError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    sys.stdout.write(openapi_json(settings).decode())
    return 0


def _new_key(args: argparse.Namespace, prog: str) -> int:
    key = new_key()
    if args.projects is None and not args.may_revoke:
        sys.stderr.write(f"{prog} new-key: error: --projects is required (or --may-revoke)\n")
        return 2
    try:
        if args.projects is None:
            projects: list[int] | str = []
        elif args.projects.strip() == "*":
            projects = "*"
        else:
            projects = [int(p) for p in args.projects.split(",")]
        entry = msgspec.convert(
            {
                "id": args.id,
                "sha256": hash_key(key),
                "projects": projects,
                "rate": args.rate,
                "burst": args.burst,
                "revoke": args.may_revoke,
            },
            ApiKey,
        )
    except ValueError as exc:  # (msgspec.ValidationError is one) a traceback was printed
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    sys.stdout.write(f"key (shown once; give it to the service): {key}\n")
    sys.stdout.write('keys-file entry (add it to the file\'s "keys" list):\n')
    sys.stdout.write(msgspec.json.encode(entry).decode() + "\n")
    return 0


def _serve(args: argparse.Namespace, prog: str) -> int:
    import uvicorn

    from publisher.client import AsyncPublisher
    from publisher.http_api.server import fit_descriptors, server_config

    error = log_arguments_error(args)
    if error is not None:
        sys.stderr.write(f"{prog}: error: {error}\n")
        return 2
    if not args.keys_file:
        sys.stderr.write(
            f"{prog}: error: --keys-file (or EVENTBUS_PUBLISH_KEYS_FILE) is required\n"
        )
        return 2
    try:
        credentials = Credentials.from_json(Path(args.keys_file).read_bytes())
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{prog}: error: {args.keys_file}: {exc}\n")
        return 2
    try:
        settings = _settings(args)
    except ValueError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    if args.limit_concurrency < 1:
        sys.stderr.write(f"{prog}: error: --limit-concurrency must be at least 1\n")
        return 2
    if not len(credentials):
        # A server without a key can only answer 401: refused like the other settings that
        # cannot work, rather than started in silence.
        sys.stderr.write(
            f"{prog}: error: {args.keys_file}: no keys: every request would be answered 401 "
            f'(add the entry that `new-key` prints to its "keys" list)\n'
        )
        return 2
    try:
        publisher = AsyncPublisher.from_url(
            args.redis_url, prefix=args.prefix, max_revocations=args.max_revocations
        )
    except ValueError as exc:  # a --max-revocations out of range, a bad URL or prefix
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    configure_logging(args.log_format, args.log_level)
    app = PublishApi(publisher, credentials, settings)
    limit_concurrency, backlog = fit_descriptors(args.limit_concurrency)
    config = server_config(
        app,
        host=args.host,
        port=args.port,
        limit_concurrency=limit_concurrency,
        backlog=backlog,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
