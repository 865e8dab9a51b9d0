"""Broker URLs: the password from the environment, escaped; never shown in messages."""

from __future__ import annotations

import redis

from gpujobs.config import Settings
from gpujobs.connection import redact, with_password


def test_password_is_escaped_into_the_url_and_redacted_in_messages() -> None:
    settings = Settings(broker_url="redis://valkey:6379/0", redis_password="p@ss:w/rd")
    url = with_password("redis://valkey:6379/0", settings)
    assert redis.connection.parse_url(url)["password"] == "p@ss:w/rd"
    assert redact(url) == "redis://:***@valkey:6379/0"
    assert "p@ss" not in redact(url)


def test_a_url_that_carries_its_own_password_is_left_alone() -> None:
    settings = Settings(redis_password="other")
    assert with_password("redis://:mine@h:1/0", settings) == "redis://:mine@h:1/0"
    assert with_password("redis://h:1/0", Settings()) == "redis://h:1/0"
