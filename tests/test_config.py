"""The gateway's settings as a user gives them (flags, environment): what is refused at start."""

from __future__ import annotations

import pytest


def test_no_setting_takes_an_infinite_number_of_seconds() -> None:
    """``inf`` parsed as a float and passed every bound (``gt=0``): ``--drain-timeout inf`` or
    ``--worker-timeout inf`` meant waiting for ever, or never checking. Every float setting,
    from a flag or the environment, is refused at start now."""
    from gateway.config import ENV_PREFIX, ConfigError, GatewayConfig, load_config

    floats = [
        name
        for name in GatewayConfig.__struct_fields__
        if isinstance(getattr(GatewayConfig(no_auth=True), name), float)
    ]
    assert {"drain_timeout", "drain_delay", "worker_timeout", "subscribe_timeout"} <= set(floats)
    for name in floats:
        flag = "--" + name.replace("_", "-")
        for value in ("inf", "Infinity", "-inf"):
            with pytest.raises(ConfigError, match=f"{flag} / {ENV_PREFIX}{name.upper()}"):
                load_config(["--no-auth", f"{flag}={value}"], environ={})
        with pytest.raises(ConfigError, match=flag):
            load_config(["--no-auth"], environ={f"{ENV_PREFIX}{name.upper()}": "inf"})
