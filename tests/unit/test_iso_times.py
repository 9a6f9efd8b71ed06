"""core/state.parse_iso and utcnow_iso without datetime (the `status` path skips importing it): same answers as
datetime.fromisoformat for every form, including the ones its fast path hands over."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from sage_llm.core.state import parse_iso, utcnow_iso


def _ref(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def test_the_written_form_reads_back_as_datetime_reads_it() -> None:
    rng = random.Random(24)
    for _ in range(5000):
        t = rng.randint(0, 2**33)
        text = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        assert parse_iso(text) == _ref(text) == t, text


@pytest.mark.parametrize("text", [
    "2024-02-29T00:00:00Z", "2026-02-29T00:00:00Z", "2026-04-31T12:00:00Z", "2026-13-01T00:00:00Z",
    "2026-12-06T24:00:00Z", "2026-12-06T18:25:01+00:00", "2026-12-06T18:25:01.5Z", "2026-12-06T18:25:01+02:00",
    "2000-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "not a time", "2026-12-06",
])
def test_edge_forms_agree_with_datetime(text: str) -> None:
    assert parse_iso(text) == _ref(text)


def test_empty_is_none_and_now_is_now() -> None:
    assert parse_iso(None) is None
    assert parse_iso("") is None
    now = datetime.now(timezone.utc).timestamp()
    written = utcnow_iso()
    assert written.endswith("Z")
    assert len(written) == 20
    assert abs((parse_iso(written) or 0) - now) < 5
