import pytest

from scheduler.budget import device_budget, format_size, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("16GiB", 16 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("1000", 1000), ("1.5 GiB", int(1.5 * 2**30)),
    ("7.5gib", int(7.5 * 2**30)),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "16 parsecs", "-1GiB", "0", "1e9"])
def test_parse_size_rejects_nonsense_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_budget_keeps_buffer_free() -> None:
    assert device_budget(16 * 2**30, 0.15) == int(16 * 2**30 * 0.85)


def test_explicit_budget_wins_but_never_exceeds_device() -> None:
    assert device_budget(80 * 2**30, 0.15, 16 * 2**30) == 16 * 2**30
    assert device_budget(8 * 2**30, 0.15, 16 * 2**30) == 8 * 2**30
    assert device_budget(0, 0.15, 4 * 2**30) == 4 * 2**30


def test_buffer_out_of_range() -> None:
    with pytest.raises(ValueError):
        device_budget(100, 1.0)


def test_format_size() -> None:
    assert format_size(1536 * 2**20) == "1.50GiB"
    assert format_size(100) == "100B"
