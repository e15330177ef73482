"""Passwords never reach text: the redaction helper, and the places that turn settings or errors into text."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prism.backends.options import OptionError
from prism.backends.postgres.options import PostgresOptions
from prism.drivers import pg
from prism.log import JsonFormatter
from prism.redact import has_secret, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://prism:s3cret@db:5432/app", "postgresql://prism:***@db:5432/app"),
        ("postgres://prism:s3cret@db/app?sslmode=require", "postgres://prism:***@db/app?sslmode=require"),
        (
            "postgresql://prism@db/app?sslmode=verify-full&password=s3cret&sslpassword=k3y",
            "postgresql://prism@db/app?sslmode=verify-full&password=***&sslpassword=***",
        ),
        ("host=db user=prism password=s3cret dbname=app", "host=db user=prism password=*** dbname=app"),
        ("host=db password = 's3 cr\\'et' dbname=app", "host=db password = *** dbname=app"),
        ("host=db password=s3\\ cret dbname=app", "host=db password=*** dbname=app"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:s3cret@cache:6380/1", "rediss://default:***@cache:6380/1"),
        ("redis://:s3@cr@et@cache:6379/0", "redis://:***@cache:6379/0"),  # an @ in the password
        ("nats://alice:s3cret@bus:4222", "nats://alice:***@bus:4222"),
        ("nats://t0ken@bus:4222", "nats://***@bus:4222"),  # a bare NATS userinfo is a token
        ("tls://t0ken@bus:4222", "tls://***@bus:4222"),
        ("tls://alice:s3cret@bus", "tls://alice:***@bus"),
        # What has no secret stays as it is.
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("postgresql://prism@db/app", "postgresql://prism@db/app"),
        ("rediss://cache:6380", "rediss://cache:6380"),
        ("password authentication failed for user prism", "password authentication failed for user prism"),
        # In running text, in reprs and in JSON.
        (
            "cannot open {'dsn': 'postgresql://u:s3cret@db/app'} now",
            "cannot open {'dsn': 'postgresql://u:***@db/app'} now",
        ),
        ('{"url":"redis://:s3cret@cache/0"}', '{"url":"redis://:***@cache/0"}'),
    ],
)
def test_masks_passwords_and_tokens_keeps_the_rest(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert has_secret(text) == (text != expected)


# Passwords as users write them in URLs: anything but blanks, control
# characters and what a URL cannot hold (double quotes, angle brackets); an @
# and a single quote included.
url_passwords = st.text(
    alphabet=st.characters(
        min_codepoint=33,
        max_codepoint=0x2FF,
        blacklist_characters='"<>',
        blacklist_categories=("Cs", "Cc", "Z"),
    ),
    min_size=1,
    max_size=40,
).map(lambda s: "Z" + s + "Q")  # never a substring of the rest of the URL


@given(url_passwords, st.sampled_from(["postgresql", "postgres", "redis", "rediss", "nats", "tls"]))
def test_no_url_password_survives(password: str, scheme: str) -> None:
    for url in (
        f"{scheme}://user:{password}@host.example:1234/0",
        f"{scheme}://:{password}@host.example",
        f"before {scheme}://user:{password}@host.example/db?x=1 after",
    ):
        assert password not in redact(url)


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_categories=("Cs",))))
def test_no_quoted_libpq_password_survives(raw: str) -> None:
    password = "Z" + raw + "Q"
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    dsn = f"host=db password={quoted} dbname=app"
    assert redact(dsn) == "host=db password=*** dbname=app"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://prism:p%zzs3cret@db/app",  # libpq quotes the bad token: the password
        "host=db password=s3cret and more",  # libpq quotes a piece of it
        "postgresql://prism:s3cret@[::1/app",  # libpq quotes the whole URI
        "host=db password='s3cret",  # unterminated
    ],
)
def test_an_invalid_dsn_is_refused_without_its_password(dsn: str) -> None:
    with pytest.raises(OptionError) as caught:
        PostgresOptions(dsn=dsn)

    assert caught.value.field == "dsn"
    assert "s3cret" not in str(caught.value)
    assert "and more" not in str(caught.value)


def test_an_invalid_dsn_without_a_password_says_what_is_wrong() -> None:
    with pytest.raises(OptionError, match='invalid URI query parameter: "bogus"'):
        PostgresOptions(dsn="postgresql://prism@db/app?bogus=1")


def test_a_driver_error_quoting_a_dsn_is_masked() -> None:
    exc = RuntimeError('connection to "postgresql://u:s3cret@db/app" failed\n\tIs the server running?\n')

    assert pg._one_line(exc) == 'connection to "postgresql://u:***@db/app" failed; Is the server running?'


def test_every_log_line_is_masked_traceback_included() -> None:
    logger = logging.getLogger("prism.test_redact")
    try:
        raise ValueError("cannot reach redis://:s3cret@cache:6379/0")
    except ValueError:
        record = logger.makeRecord(
            logger.name,
            logging.ERROR,
            __file__,
            1,
            "namespace %s: dsn %s",
            ("ledger", "host=db password=s3cret"),
            sys.exc_info(),
        )

    line = JsonFormatter().format(record)

    assert "s3cret" not in line
    entry = json.loads(line)
    assert entry["msg"] == "namespace ledger: dsn host=db password=***"
    assert "redis://:***@cache:6379/0" in entry["exc"]
