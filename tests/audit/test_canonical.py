from datetime import datetime, timedelta, timezone

import pytest

from audit.canonical import canonical_bytes, canonical_time


def test_it_sorts_keys_and_drops_whitespace():
    assert canonical_bytes({"b": [1, 2], "a": {"d": None, "c": True}}) == (
        b'{"a":{"c":true,"d":null},"b":[1,2]}'
    )


def test_it_writes_utf8_without_escapes():
    assert canonical_bytes({"name": "Zoë 東京"}) == '{"name":"Zoë 東京"}'.encode("utf-8")


def test_it_keeps_big_integers_exact():
    assert canonical_bytes({"n": 2**70}) == b'{"n":1180591620717411303424}'


def test_it_refuses_a_float_naming_its_key():
    with pytest.raises(ValueError, match=r"\$\.usage\.latency: floats are not allowed"):
        canonical_bytes({"usage": {"latency": 0.25}})


def test_it_refuses_a_float_inside_a_list():
    with pytest.raises(ValueError, match=r"\$\.sizes\[1\]: floats"):
        canonical_bytes({"sizes": [1, 2.0]})


def test_it_refuses_nan():
    with pytest.raises(ValueError, match="floats"):
        canonical_bytes({"score": float("nan")})


def test_it_refuses_keys_that_are_not_strings():
    with pytest.raises(ValueError, match="key 1 is not a string"):
        canonical_bytes({1: "one"})


def test_it_refuses_nul_characters():
    with pytest.raises(ValueError, match="NUL"):
        canonical_bytes({"target": "a\x00b"})


def test_it_refuses_other_types():
    with pytest.raises(ValueError, match="bytes is not allowed"):
        canonical_bytes({"blob": b"raw"})


def test_time_is_utc_with_microseconds_and_z():
    moment = datetime(2025, 1, 2, 4, 4, 5, 6, tzinfo=timezone(timedelta(hours=1)))
    assert canonical_time(moment) == "2025-01-02T03:04:05.000006Z"


def test_time_refuses_naive_datetimes():
    with pytest.raises(ValueError, match="timezone-aware"):
        canonical_time(datetime(2025, 1, 2))
