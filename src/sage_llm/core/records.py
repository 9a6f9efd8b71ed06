"""`Record`: typed data classes for the `status` path without the `dataclasses` module.

`status --json` is polled by Studio and scripts (budget: 4x `python -c pass`). `import dataclasses` alone costs about
0.9x of that floor here (it imports `inspect`, `ast`, `dis`, `tokenize`), and each `@dataclass` compiles its methods
with `exec` when its module is imported (~0.45 ms for 12 fields; docs/benchmarks.md "CLI start-up"). A `Record`
subclass is declared like a dataclass and type-checked like one (PEP 681 `dataclass_transform`: mypy checks the
constructor, defaults and `frozen`), but its methods are shared, so defining one costs ~10 us.

    class Probe(Record):
        port: int
        models: list[str] = field(default_factory=list)

    class Birth(Record, frozen=True):
        pid: int

What it keeps of dataclasses: positional and keyword construction in declaration order (inherited fields first),
defaults and `field(default_factory=...)`, `__post_init__`, `repr`, `==` (same class, equal fields), unhashable
unless frozen, `frozen=True` (assignment raises `FrozenRecordError`, an AttributeError), and `asdict`, `fields`,
`replace` below. No ordering, no slots, no InitVar/ClassVar handling beyond skipping `ClassVar` annotations.
"""

from __future__ import annotations

from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~0.3x of the floor): not on the status path
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar

    from typing_extensions import dataclass_transform  # typing's from 3.11; Python 3.10 is supported

    R = TypeVar("R", bound="Record")
else:
    def dataclass_transform(**_kwargs):  # only type checkers read it
        return lambda cls: cls

_MISSING: Any = object()


class FrozenRecordError(AttributeError):
    """Assignment to a field of a frozen Record."""


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default: Any, default_factory: Callable[[], Any] | None) -> None:
        self.default, self.default_factory = default, default_factory


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None) -> Any:
    """A field's default (`default_factory` for a fresh mutable one per instance), as dataclasses.field."""
    return _Field(default, default_factory)


@dataclass_transform(field_specifiers=(field,))
class Record:
    __record_fields__: ClassVar[tuple[str, ...]] = ()
    __record_fieldset__: ClassVar[frozenset[str]] = frozenset()
    __record_defaults__: ClassVar[dict[str, _Field]] = {}
    __record_frozen__: ClassVar[bool] = False

    def __init_subclass__(cls, frozen: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = list(cls.__record_fields__)
        defaults = dict(cls.__record_defaults__)
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect.get_annotations imports inspect)
        for name, annotation in own.items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            if name not in names:
                names.append(name)
            if name in cls.__dict__:
                value = cls.__dict__[name]
                defaults[name] = value if isinstance(value, _Field) else _Field(value, None)
                if isinstance(value, _Field):
                    if value.default is _MISSING:
                        delattr(cls, name)
                    else:
                        setattr(cls, name, value.default)
        seen_default = False
        for name in names:
            if name in defaults:
                seen_default = True
            elif seen_default:
                raise TypeError(f"{cls.__name__}: non-default field {name!r} follows a default field")
        cls.__record_fields__ = tuple(names)
        cls.__record_fieldset__ = frozenset(names)
        cls.__record_defaults__ = defaults
        cls.__record_frozen__ = frozen or cls.__record_frozen__
        cls.__hash__ = Record._hash if cls.__record_frozen__ else None  # type: ignore[assignment,method-assign]
        if cls.__record_frozen__:  # set here, not declared on Record: mypy would then allow any attribute
            cls.__setattr__ = _frozen  # type: ignore[assignment,method-assign]
            cls.__delattr__ = _frozen  # type: ignore[assignment,method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self.__record_fields__
        if args:
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__}() takes {len(names)} positional arguments but {len(args)} "
                                "were given")
            for name, value in zip(names, args):
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
                kwargs[name] = value
        if not kwargs.keys() <= self.__record_fieldset__:
            unknown = next(k for k in kwargs if k not in self.__record_fieldset__)
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown!r}")
        if len(kwargs) != len(names):
            defaults = self.__record_defaults__
            for name in names:
                if name not in kwargs:
                    spec = defaults.get(name)
                    if spec is None:
                        raise TypeError(f"{type(self).__name__}() missing required argument: {name!r}")
                    kwargs[name] = spec.default_factory() if spec.default_factory is not None else spec.default
        # in declaration order (vars() and JSON keep it); bypasses a frozen class's __setattr__, as dataclasses do
        self.__dict__.update({n: kwargs[n] for n in names})
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.__record_fields__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__record_fields__)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def _hash(self) -> int:
        return hash(self._values())


def _frozen(self: Record, name: str, *_value: Any) -> None:
    raise FrozenRecordError(f"cannot assign to or delete field {name!r} of a frozen {type(self).__name__}")


def fields(record: Record | type[Record]) -> tuple[str, ...]:
    """The field names, in declaration order."""
    return record.__record_fields__


def asdict(record: Record) -> dict[str, Any]:
    """The fields as a dict, nested Records, lists, tuples and dicts converted and copied (as dataclasses.asdict)."""
    return {n: _plain(getattr(record, n)) for n in record.__record_fields__}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return asdict(value)
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def replace(record: R, **changes: Any) -> R:
    """A copy of `record` with `changes` (as dataclasses.replace: __post_init__ runs again)."""
    values = {n: getattr(record, n) for n in record.__record_fields__}
    values.update(changes)
    return type(record)(**values)
