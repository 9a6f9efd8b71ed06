"""core/records.Record: the dataclass-like typed records of the status path (no `dataclasses` import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sage_llm.core.records import FrozenRecordError, Record, asdict, field, fields, replace


class Point(Record):
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)


class Point3(Point):
    z: float = 1.0

    def __post_init__(self) -> None:
        self.z = float(self.z)


class Key(Record, frozen=True):
    a: int
    b: str | None = None


class Outer(Record):
    inner: Point
    more: list[Point] = field(default_factory=list)


def test_construction_defaults_and_factories() -> None:
    p, q = Point(1), Point(x=1)
    assert (p.x, p.y, p.tags) == (1, 0, [])
    assert p == q
    assert p.tags is not q.tags
    assert Point(1, 2, ["t"]) == Point(x=1, y=2, tags=["t"]) != Point(1, 3)
    assert fields(Point3) == ("x", "y", "tags", "z")
    assert Point3(1, z=2).z == 2.0
    assert repr(Point(1)) == "Point(x=1, y=0, tags=[])"
    assert list(vars(Point(tags=[], y=2, x=1))) == ["x", "y", "tags"]  # declaration order, as dataclasses
    assert Point(1) != Point3(1)  # another class: not equal, as dataclasses


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((), {}, "missing required argument: 'x'"),
    ((1, 2, [], 4), {}, "takes 3 positional arguments"),
    ((1,), {"x": 2}, "multiple values for argument 'x'"),
    ((1,), {"w": 2}, "unexpected keyword argument 'w'"),
    ((), {"x": 1, "w": 2, "y": 3}, "unexpected keyword argument 'w'"),
])
def test_bad_construction_raises_as_a_dataclass_would(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_frozen_hashable_and_mutable_not() -> None:
    k = Key(1)
    with pytest.raises(FrozenRecordError):
        k.a = 2  # type: ignore[misc]
    assert {k, Key(1)} == {Key(1)}
    with pytest.raises(TypeError):
        hash(Point(1))
    p = Point(1)
    p.y = 5
    assert p.y == 5


def test_asdict_and_replace() -> None:
    o = Outer(Point(1, tags=["a"]), [Point(2)])
    d = asdict(o)
    assert d == {"inner": {"x": 1, "y": 0, "tags": ["a"]}, "more": [{"x": 2, "y": 0, "tags": []}]}
    assert d["inner"]["tags"] is not o.inner.tags
    r = replace(Point3(1, z=3), y=4)
    assert r == Point3(1, 4, [], 3.0)


HEAVY = ("dataclasses", "inspect", "typing", "threading", "datetime", "socket", "secrets", "typer", "pydantic", "rich",
         "psutil", "httpx")


@pytest.mark.parametrize(("argv", "heavy"), [
    (["status", "--json"], HEAVY),
    (["status", "-q"], HEAVY),
    (["status"], ("typer", "pydantic", "psutil", "httpx")),  # the table needs Rich, and Rich imports dataclasses
])
def test_the_status_path_imports_no_dataclasses_nor_typer(tmp_path, argv: list[str], heavy: tuple[str, ...]) -> None:
    """Why Record and cli/fast_status.py exist: `status` must not pay for `import dataclasses` nor Typer (and the
    pydantic Typer imports to build a command): docs/benchmarks.md, "CLI start-up"."""
    code = ("import sys, io, contextlib\nfrom sage_llm.cli.main import run\n"
            f"with contextlib.redirect_stdout(io.StringIO()): run({argv!r})\n"
            f"heavy = {heavy!r}\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    env = {"SAGE_LLM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SAGE_LLM_DOTENV": "",
           "SAGE_LLM_CONFIG": str(tmp_path / "none.toml")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
