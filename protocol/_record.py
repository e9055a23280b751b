"""Frozen records for the protocol's messages, without importing ``dataclasses``.

``@record`` makes what ``@dataclasses.dataclass(frozen=True[, slots=True])``
makes of the protocol's classes: an ``__init__`` that sets each field and
calls ``__post_init__``, field-wise ``__eq__`` and ``__hash__``, a ``__repr__``,
``__match_args__``, and a ``__setattr__``/``__delattr__`` that raise
``dataclasses.FrozenInstanceError``. The type checker sees the real
``dataclass`` (``protocol/_base.py`` and the others import this name as
``dataclass`` under ``TYPE_CHECKING``).

Why: ``import dataclasses`` imports ``inspect`` (with ``ast``, ``dis``,
``tokenize``), and ``@dataclass`` compiles six functions per class; for the
protocol's 30 classes that was a third of a one-shot ``jobctl`` command's
imports (issue 26). Here one small ``__init__`` is compiled per class.

The ``dataclasses`` functions still work on these classes (``fields``,
``replace``, ``asdict``, ``is_dataclass``): ``__dataclass_fields__`` is built,
with ``dataclasses`` imported, the first time something asks for it. Only what
the protocol uses is supported: fields with plain defaults (no
``field(...)``), ``ClassVar`` annotations left alone, single inheritance of
fields from other records. tests/test_protocol_record.py compares every
protocol class with a real dataclass of the same fields.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

_MISSING = object()


class _LazyFields:
    """``__dataclass_fields__``: real ``dataclasses.Field`` objects, made on first use."""

    def __get__(self, obj: object, owner: type) -> dict[str, Any]:
        import dataclasses

        made: dict[str, Any] = {}
        for name in owner.__record_fields__:  # type: ignore[attr-defined]
            default = owner.__record_defaults__.get(name, dataclasses.MISSING)  # type: ignore[attr-defined]
            f = dataclasses.field(default=default)
            f.name = name
            f.type = owner.__record_types__[name]  # type: ignore[attr-defined]
            f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
            made[name] = f
        return made


def _frozen_setattr(self: object, name: str, value: object) -> None:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _values(self: object) -> tuple[object, ...]:
    return tuple([getattr(self, name) for name in self.__record_fields__])  # type: ignore[attr-defined]


def _eq(self: object, other: object) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: object) -> int:
    return hash(_values(self))


def _repr(self: object) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}"
                      for name in self.__record_fields__)  # type: ignore[attr-defined]
    return f"{self.__class__.__qualname__}({inner})"


def _getstate(self: object) -> tuple[object, ...]:
    return _values(self)


def _setstate(self: object, state: tuple[object, ...]) -> None:
    for name, value in zip(self.__record_fields__, state, strict=True):  # type: ignore[attr-defined]
        object.__setattr__(self, name, value)


def record(cls: type[_T] | None = None, /, *, frozen: bool = True,
           slots: bool = False) -> Any:
    """``@record`` or ``@record(frozen=True, slots=True)``: see the module's docstring."""
    assert frozen, "protocol records are frozen"

    def wrap(klass: type[_T]) -> type[_T]:
        return _make(klass, slots)

    return wrap if cls is None else wrap(cls)


def _make(cls: type[_T], slots: bool) -> type[_T]:
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - inspect is what we avoid
    names: list[str] = []
    defaults: dict[str, object] = {}
    types: dict[str, object] = {}
    for base in reversed(cls.__mro__[1:]):
        if "__record_fields__" in base.__dict__:
            for name in base.__record_fields__:  # type: ignore[attr-defined]
                if name not in names:
                    names.append(name)
            defaults.update(base.__record_defaults__)  # type: ignore[attr-defined]
            types.update(base.__record_types__)  # type: ignore[attr-defined]
    for name, annotation in own.items():
        if isinstance(annotation, str) and annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        if name not in names:
            names.append(name)
        types[name] = annotation
        value = cls.__dict__.get(name, _MISSING)
        if value is not _MISSING:
            defaults[name] = value
        else:
            defaults.pop(name, None)
    seen_default = False
    params = []
    body = []
    scope: dict[str, object] = {"_set": object.__setattr__}
    for i, name in enumerate(names):
        if name in defaults:
            scope[f"_d{i}"] = defaults[name]
            params.append(f"{name}=_d{i}")
            seen_default = True
        else:
            if seen_default:
                raise TypeError(f"non-default argument {name!r} follows default argument")
            params.append(name)
        body.append(f"  _set(self, {name!r}, {name})")
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "  pass")
    exec(source, scope)
    init = scope["__init__"]

    namespace = {k: v for k, v in cls.__dict__.items()
                 if k not in ("__dict__", "__weakref__")}
    if slots:
        inherited = {n for base in cls.__mro__[1:] for n in base.__dict__.get("__slots__", ())}
        namespace["__slots__"] = tuple(n for n in names if n not in inherited)
        for name in names:
            namespace.pop(name, None)  # a default may not shadow its slot
        namespace["__getstate__"] = _getstate  # pickle and copy, as dataclasses does
        namespace["__setstate__"] = _setstate
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    namespace.update({
        "__init__": init,
        "__repr__": _repr,
        "__eq__": _eq,
        "__hash__": _hash,
        "__setattr__": _frozen_setattr,
        "__delattr__": _frozen_delattr,
        "__match_args__": tuple(names),
        "__record_fields__": tuple(names),
        "__record_defaults__": defaults,
        "__record_types__": types,
        "__dataclass_fields__": _LazyFields(),
    })
    meta: Any = type(cls)
    made: type[_T] = meta(cls.__name__, cls.__bases__, namespace)
    made.__qualname__ = cls.__qualname__
    return made


def fields_of(cls: type) -> tuple[str, ...]:
    """A record's field names, in order (``dataclasses.fields`` without the import)."""
    names: tuple[str, ...] = cls.__record_fields__  # type: ignore[attr-defined]
    return names


def replace(obj: _T, /, **changes: object) -> _T:
    """``dataclasses.replace`` for records, without the import."""
    values = {name: getattr(obj, name) for name in obj.__record_fields__}  # type: ignore[attr-defined]
    values.update(changes)
    return obj.__class__(**values)
