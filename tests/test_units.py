import pytest

from racebench.bench.units import geometric_lengths, parse_bytes, parse_duration, parse_length, parse_lengths
from racebench.errors import UsageError


@pytest.mark.parametrize("text, tokens", [("2^20", 2**20), ("2**10", 1024), ("1M", 2**20), ("64K", 65536),
                                          ("1048576", 2**20), ("1.5K", 1536)])
def test_lengths(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("bad", ["0", "-5", "abc", "1.3", "2^"])
def test_bad_lengths(bad):
    with pytest.raises(UsageError):
        parse_length(bad)


def test_length_lists_must_increase():
    assert parse_lengths("1K,2K,4096") == [1024, 2048, 4096]
    with pytest.raises(UsageError, match="strictly increasing"):
        parse_lengths("4K,1K")


def test_geometric_lengths():
    assert geometric_lengths(1024, 8192, 2) == [1024, 2048, 4096, 8192]
    assert geometric_lengths(1000, 4000, 1.5)[:3] == [1000, 1500, 2250]
    with pytest.raises(UsageError):
        geometric_lengths(8, 4, 2)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("500ms", 0.5), ("2", 2), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, n", [("1GiB", 2**30), ("512MB", 512 * 10**6), ("2g", 2 * 2**30), ("50%", 500)])
def test_sizes(text, n):
    assert parse_bytes(text, total=1000) == n


@pytest.mark.parametrize("bad", ["lots", "0GB", "150%", "-1MB"])
def test_bad_sizes(bad):
    with pytest.raises(UsageError):
        parse_bytes(bad, total=1000)


def test_growth_limits_as_percentages_or_factors():
    from racebench.bench.units import parse_growth

    assert parse_growth("10%", option="--x") == 0.1 and parse_growth("150%", option="--x") == 1.5
    assert abs(parse_growth("1.1x", option="--x") - 0.1) < 1e-12
    for bad in ("0.9x", "ten", "10"):
        with pytest.raises(UsageError, match="--x takes a percentage or a factor"):
            parse_growth(bad, option="--x")
