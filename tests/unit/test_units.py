import pytest

from pilotflow.bundle.units import format_duration, parse_duration, parse_size_mb
from pilotflow.schedulers.base import format_hms


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("1-12:00:00", 129600),
    ("01:30:00", 5400), ("5:30", 330), ("2d", 172800), ("1.5h", 5400), (45, 45), ("45", 45),
    ("1d2h", 93600), ("2-3", 2 * 86400 + 3 * 3600), ("0:00:01", 1), (" 10m ", 600),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "1:60:00", "-5", -5, True, "h", [1], "10:75"])
def test_bad_durations_say_what_is_accepted(bad):
    with pytest.raises(ValueError) as e:
        parse_duration(bad)
    assert "duration" in str(e.value) or "below 60" in str(e.value) or "negative" in str(e.value)


@pytest.mark.parametrize("text,mb", [
    ("512M", 512), ("2G", 2048), ("1T", 1024 ** 2), (300, 300), ("2GB", 2048), ("2GiB", 2048),
    ("1.5G", 1536), ("2048K", 2), ("100", 100),
])
def test_sizes(text, mb):
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize("bad", ["2X", "", "G", -1, False, "1.2.3G"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size_mb(bad)


def test_formats():
    assert format_hms(129600) == "1-12:00:00"
    assert format_hms(5400) == "01:30:00"
    assert format_hms(59) == "00:00:59"
    assert format_duration(5400) == "1h30m"
    assert format_duration(45) == "45s"
    assert format_duration(90061) == "1d1h"
