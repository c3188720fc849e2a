"""planner.frozen: frozen classes without dataclasses' exec-compiled methods behave as the frozen
dataclasses they replace (fields in order, defaults, immutability; value equality with eq=True)."""
from dataclasses import FrozenInstanceError

import pytest

from planner.costmodel.elements import ElementBytes
from planner.frozen import frozen


@frozen(eq=True)
class Key:
    a: int
    b: str = "x"


@frozen
class Ident:
    a: object


def test_value_classes_compare_and_hash_by_their_fields():
    assert Key(1) == Key(1, "x") == Key(a=1, b="x") and hash(Key(1)) == hash(Key(1, "x"))
    assert Key(1) != Key(2) and Key(1) != Key(1, "y") and Key(1) != (1, "x")
    assert {Key(1): "one"}[Key(1, "x")] == "one"
    assert ElementBytes() == ElementBytes() and ElementBytes() != ElementBytes(grad=2.0)


def test_identity_classes_compare_by_identity_and_stay_frozen():
    a = Ident([1])
    assert a == a and a != Ident([1]) and len({a, Ident([1])}) == 2
    with pytest.raises(FrozenInstanceError):
        a.a = [2]
    with pytest.raises(FrozenInstanceError):
        Key(1).b = "y"
    with pytest.raises(TypeError, match="missing field 'a'"):
        Key()
    assert repr(Key(1)) == "Key(a=1, b='x')"
