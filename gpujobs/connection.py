"""Finding and reaching the broker: the configured one, or the embedded local stack."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from gpujobs import local
from gpujobs.config import Settings
from gpujobs.errors import BrokerUnreachable


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def with_password(url: str, settings: Settings) -> str:
    """Put GPUJOBS_REDIS_PASSWORD into a URL that carries none (the Secret stays out of config)."""
    if settings.redis_password is None:
        return url
    parts = urlsplit(url)
    if parts.password is not None or not parts.hostname:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    user = parts.username or ""
    # Escaped: a password with '@', ':' or '/' would otherwise break the URL.
    password = quote(settings.redis_password.get_secret_value(), safe="")
    netloc = f"{user}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def broker_url(settings: Settings, start_local: bool = True) -> str:
    """The broker to use: GPUJOBS_BROKER_URL, else the local stack's (started if asked)."""
    if settings.broker_url:
        return with_password(settings.broker_url, settings)
    if start_local:
        return local.ensure_running(settings)
    running = local.running_url(settings)
    if running is None:
        raise BrokerUnreachable("the local stack is not running (start it with `gpujobs up`)")
    return running


def connect(url: str, settings: Settings) -> redis.Redis:
    """A client for `url` that has answered PING; BrokerUnreachable names the URL if not.

    The first PING is tried once, so a wrong URL fails fast; afterwards the client retries
    with backoff, so a running job rides out a broker restart or a dropped connection.
    """
    options = {
        "decode_responses": True,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": max(10.0, settings.connect_timeout_s),
        "health_check_interval": 30,
    }
    try:
        with redis.Redis.from_url(url, retry=Retry(NoBackoff(), retries=0), **options) as probe:
            probe.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise BrokerUnreachable(f"cannot reach the broker at {redact(url)}: {exc}") from None
    # About 15 s of backoff in all before an operation gives up.
    retry = Retry(ExponentialWithJitterBackoff(base=0.25, cap=4.0), retries=6)
    return redis.Redis.from_url(
        url, retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError], **options
    )
