"""protocol/_record.py: the messages' records behave as the frozen dataclasses
they replaced (issue 26: importing ``dataclasses`` cost a one-shot command
``inspect``, ``ast``, ``dis`` and six compiled functions per class)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import subprocess
from typing import Any

import pytest

import protocol as p
from protocol._record import fields_of, record, replace

from .conftest import PYTHON, RUN_CWD
from .test_protocol_messages import EXAMPLES

CLASSES = sorted({*p.MESSAGE_TYPES.values(), p.JobStatus, p.Limits, p.DecodeLimits, p.Terminal},
                 key=lambda c: c.__name__)


def _twin(obj: Any) -> Any:
    """A real frozen dataclass with the same name, fields and values."""
    cls = type(obj)
    twin = dataclasses.make_dataclass(cls.__name__, [(n, Any) for n in fields_of(cls)],
                                      frozen=True)
    twin.__qualname__ = cls.__qualname__
    return twin(*(getattr(obj, n) for n in fields_of(cls)))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dataclasses_functions_see_the_fields(cls: type[Any]) -> None:
    assert dataclasses.is_dataclass(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert names == list(fields_of(cls)) == list(cls.__match_args__)
    own = [n for klass in reversed(cls.__mro__) for n, a in
           inspect.get_annotations(klass).items() if not a.startswith("ClassVar")]
    assert names == list(dict.fromkeys(own))


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_a_record_is_what_its_dataclass_was(msg: Any) -> None:
    twin = _twin(msg)
    assert repr(msg) == repr(twin)
    assert hash(msg) == hash(twin)
    assert msg == type(msg)(*(getattr(msg, n) for n in fields_of(type(msg))))
    assert msg != twin  # another class, as two dataclasses would be
    assert dataclasses.asdict(msg) == dataclasses.asdict(twin)
    assert dataclasses.replace(msg) == msg == replace(msg)
    assert pickle.loads(pickle.dumps(msg)) == msg
    assert copy.copy(msg) == msg and copy.deepcopy(msg) == msg
    name = (*fields_of(type(msg)), "anything")[0]  # a message may have no field (tick)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, name, getattr(msg, name, None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(msg, name)


def test_replace_validates_and_defaults_apply() -> None:
    status = next(m for m in EXAMPLES if isinstance(m, p.Started)).status
    assert replace(status, id=9).id == 9
    with pytest.raises(p.FieldError):
        replace(status, id=-1)  # __post_init__ runs
    with pytest.raises(p.FieldError):
        dataclasses.replace(status, owner=3)
    assert p.Stream(4) == p.Stream(4, 0, False, False) == p.Stream(job=4)
    with pytest.raises(TypeError):
        p.Stream()  # type: ignore[call-arg]
    assert not hasattr(p.Stream(4), "__dict__")  # slots, as before


def test_record_rules() -> None:
    with pytest.raises(TypeError, match="follows default"):
        @record
        class Bad:
            a: int = 1
            b: int

    @record(frozen=True, slots=True)
    class Base:
        a: int
        b: str = "x"

    @record(frozen=True, slots=True)
    class Child(Base):
        c: float = 1.0

    assert fields_of(Child) == ("a", "b", "c")
    assert repr(Child(1)) == "test_record_rules.<locals>.Child(a=1, b='x', c=1.0)"


def test_importing_protocol_imports_neither_dataclasses_nor_inspect() -> None:
    code = ("import sys, protocol; print(sorted(m for m in ('dataclasses', 'inspect', 'ast')"
            " if m in sys.modules))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=RUN_CWD,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
