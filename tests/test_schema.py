"""The one validation grammar (``pruning_env.schema``) on every configuration object: each field documented, each
checked at creation against its type and declared limits, errors naming ``section.field`` and what is allowed.
"""
import ast
import dataclasses
import inspect
import math
import typing
from typing import Optional, Tuple

import pytest

from pruning_env.envs.config import PatchEnvConfig, PruneEnvConfig
from pruning_env.envs.parallel import ParallelConfig
from pruning_env.schema import UnknownSettingError, from_mapping, limits_of, merged, setting, validate
from rl_prune.config import FinetuneConfig, PruneRunConfig, RunOptions, ViTEvalOptions, ViTRunConfig

CONFIGS = [PruneEnvConfig, PatchEnvConfig, ParallelConfig, PruneRunConfig, FinetuneConfig, RunOptions, ViTRunConfig,
           ViTEvalOptions]


@dataclasses.dataclass
class Example:
    section = "example"

    count: int = setting(1, low=1)
    """a count"""
    fraction: float = setting(0.5, low=0, high=1, low_open=True, high_open=True, what="a fraction")
    """a fraction"""
    mode: Optional[str] = setting(None, choices=(None, "a", "b"))
    """a mode"""
    names: Tuple[str, ...] = ()
    """names"""
    flag: bool = False
    """a flag"""
    inner: ParallelConfig = setting(default_factory=ParallelConfig)
    """a nested section"""
    even: Optional[int] = setting(None, check=lambda v: None if v % 2 == 0 else "odd")
    """an even number"""

    def __post_init__(self) -> None:
        validate(self)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(count=0), ValueError, "example.count must be an integer >= 1, got 0"),
    (dict(count=2.0), TypeError, "example.count must be an integer >= 1, got 2.0"),
    (dict(count=True), TypeError, "example.count must be an integer >= 1, got True"),
    (dict(fraction=1), ValueError, "example.fraction must be a fraction in (0, 1), got 1"),
    (dict(fraction=math.nan), ValueError, "example.fraction must be a fraction in (0, 1), got nan"),
    (dict(mode="c"), ValueError, "example.mode must be one of (None, 'a', 'b'), got 'c'"),
    (dict(mode="None"), ValueError, "example.mode must be one of (None, 'a', 'b'), got 'None'"),
    (dict(names="ab"), TypeError, "example.names must be a list of strings, got 'ab'"),
    (dict(flag="yes"), TypeError, "example.flag must be true or false, got 'yes'"),
    (dict(inner="ray"), TypeError, "example.inner must be a mapping of ParallelConfig fields"),
    (dict(inner={"backend": "dask"}), ValueError, "parallel.backend must be one of ('serial', 'ray'), got 'dask'"),
    (dict(even=3), ValueError, "example.even must be None or an integer, got 3: odd"),
])
def test_errors_name_the_field_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error) as err:
        Example(**kwargs)
    assert str(err.value) == message or str(err.value).startswith(message)


def test_values_are_normalised():
    e = Example(names=["x", "y"], inner={"num_workers": 3}, fraction=0.25)
    assert e.names == ("x", "y") and e.inner == ParallelConfig(num_workers=3)


def test_unknown_names_are_type_and_value_errors_listing_the_valid_ones():
    with pytest.raises(UnknownSettingError, match=r"unknown example key\(s\) \['cuont'\]; valid: count, fraction"):
        from_mapping(Example, {"cuont": 2})
    assert issubclass(UnknownSettingError, TypeError) and issubclass(UnknownSettingError, ValueError)


def test_merged_applies_overrides_to_a_config_and_checks_them_again():
    base = Example(count=3)
    assert merged(Example, base, {}) is base
    assert merged(Example, base, {"flag": True}) == Example(count=3, flag=True)
    with pytest.raises(ValueError, match="example.count"):
        merged(Example, base, {"count": -1})
    with pytest.raises(TypeError, match="config must be a Example"):
        merged(Example, ParallelConfig(), {})


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_configuration_field_has_a_one_line_docstring(cls):
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    documented = {stmt.target.id for stmt, nxt in zip(body, body[1:])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                  and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}
    assert documented == {f.name for f in dataclasses.fields(cls)}


def _bad_value(f: dataclasses.Field, hint):
    """A value the field's limits refuse (below its lower limit, or not among its choices), or None."""
    limits = limits_of(f)
    if limits.choices is not None:
        return "__not_a_choice__"
    if limits.low is not None and hint in (int, float, Optional[int], Optional[float]):
        return int(limits.low) - 1 if hint in (int, Optional[int]) else limits.low - 1.0
    return None


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_configuration_checks_its_limits_at_creation(cls):
    """Each field with a lower limit or choices refuses a value outside them, naming the field: the grammar is used
    by every configuration object, not only declared."""
    hints = typing.get_type_hints(cls)
    section = getattr(cls, "section", None)
    checked = 0
    for f in dataclasses.fields(cls):
        bad = _bad_value(f, hints[f.name])
        if bad is None:
            continue
        name = f"{section}.{f.name}" if section else f.name
        with pytest.raises(ValueError, match=rf"^{name} must be "):
            cls(**{f.name: bad})
        checked += 1
    assert checked >= 1
