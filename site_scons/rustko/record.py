"""Immutable records (named tuples) declared like `typing.NamedTuple`, for the tables and values
every `rustko check` builds at start-up.

`typing.NamedTuple` checks each field's annotation, and under `from __future__ import
annotations` every annotation is a string it compiles: the first compile builds the AST module's
types (about 10 million instructions, a tenth of a one-module check), and importing `typing` at
all costs more than half of that again. `record` makes the same `collections.namedtuple` from
the annotations' names and leaves the annotations for readers and type checkers, unevaluated.
`Slotted` gives the mutable plain classes of the same path (Finding, KernelView) a dataclass's
equality and `repr`.
"""

from __future__ import annotations

from collections import namedtuple

# A class body's own entries that are not the record's fields or methods.
_CLASS_ENTRIES = frozenset({"__dict__", "__weakref__", "__annotations__", "__module__", "__qualname__"})


def record(cls: type) -> type:
    """`cls` as a named tuple: its annotated names are the fields, in order, those with a value
    in the class body take it as their default (fields without one come first), and its
    methods and docstring are set on the named tuple, as `typing.NamedTuple` does (methods
    must not use zero-argument `super()`, whose class is the one replaced). A subclass of
    `tuple`: equality, hashing, unpacking, `_replace` and `_asdict` as there."""
    annotations = cls.__dict__.get("__annotations__", {})
    fields = tuple(annotations)
    defaults = [cls.__dict__[name] for name in fields if name in cls.__dict__]
    if any(name not in cls.__dict__ for name in fields[len(fields) - len(defaults):]):
        raise TypeError(f"{cls.__name__}: a field without a default follows one with a default")
    made = namedtuple(cls.__name__, fields, defaults=defaults, module=cls.__module__)
    for key, value in cls.__dict__.items():
        if key not in fields and key not in _CLASS_ENTRIES:
            setattr(made, key, value)
    made.__qualname__ = cls.__qualname__
    made.__annotations__ = annotations
    return made


class Slotted:
    """Equality and `repr` over `FIELDS` for plain classes with slots (`report.Finding`,
    `kernelview.KernelView`): what a dataclass gave them, without importing `dataclasses`."""

    __slots__ = ()
    FIELDS: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self.FIELDS, self._values()))
        return f"{type(self).__name__}({fields})"
