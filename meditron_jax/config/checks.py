"""Checking the gin configuration before anything runs: types, ranges, names, quoting.

Owns: `check_bindings()` (every value bound to `train.*`, `optimizer.*`, `mesh.*`, `pipeline.*`,
`sharding.*`, `data.*`, `model.*`, `checkpoint.*` -- from gin files and `--gin_param` -- against
the type hints of the configurable that receives it, and against `Range` bounds declared with
`typing.Annotated` on the configurable's signature or on the dataclass it returns) and
`explain_parse_error()` (gin's parse errors made into one line: "did you mean" for unknown
names, a quoting hint for unquoted strings).

The check is declarative: there is no list of keys here. A new `train.*` field is checked as
soon as it has a type hint; a bound is one `Annotated[int, Range(min=1)]` on its field.

Values gin cannot know until the call (`@references`, `%macros`) are left to the configurable.
Every refusal is a `ConfigError` (a `UserError`: one line, exit 2) naming the key, the value
and what is expected.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import logging
import re
import types
import typing
from typing import Any

from meditron_jax.errors import UserError

CHECKED = ("train", "optimizer", "mesh", "pipeline", "sharding", "data", "model", "checkpoint")


class ConfigError(UserError):
    """A gin value of the wrong type or out of range, an unknown name, an unparsable binding."""


@dataclasses.dataclass(frozen=True)
class Range:
    """`Annotated[float, Range(min=0, max=1, max_open=True)]`: the bounds of a numeric value,
    inclusive unless `min_open` / `max_open`. A bound may name another value instead of a number:
    a parameter of the same configurable (`max="lr"`) or of another one (`max="train.steps"`);
    that bound applies when the named value is a literal (bound in gin, or its default). On a list
    or a mapping the range applies to each element / value. `warn`: outside the range is a
    warning saying this, not an error (a legitimate but unusual setting)."""
    min: float | str | None = None
    max: float | str | None = None
    min_open: bool = False
    max_open: bool = False
    warn: str = ""

    def describe(self, lookup=lambda name: None) -> str:
        def bound(b):
            if isinstance(b, str):
                v = lookup(b)
                return f"{b} ({v!r})" if v is not None else b
            return f"{b:g}" if isinstance(b, float) else str(b)
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.min_open else '['}{bound(self.min)}, {bound(self.max)}{')' if self.max_open else ']'}"
        if self.min is not None:
            return f"{'>' if self.min_open else '>='} {bound(self.min)}"
        return f"{'<' if self.max_open else '<='} {bound(self.max)}"

    def holds(self, v, lookup=lambda name: None) -> bool:
        lo = lookup(self.min) if isinstance(self.min, str) else self.min
        hi = lookup(self.max) if isinstance(self.max, str) else self.max
        lo = lo if _number(lo) else None  # a named bound that is unset or not a number: no bound
        hi = hi if _number(hi) else None
        if lo is not None and (v <= lo if self.min_open else v < lo):
            return False
        return hi is None or (v < hi if self.max_open else v <= hi)

    def violation(self, value, lookup=lambda name: None) -> str | None:
        """What is wrong with `value` (every element of a list / mapping), or None."""
        for v in _numbers(value):
            if v != v or not self.holds(v, lookup):  # NaN is never in range
                return self.describe(lookup)
        return None


@dataclasses.dataclass(frozen=True)
class NotAllZero:
    """`Annotated[Mapping[str, float], NotAllZero()]`: at least one value above zero."""
    warn: str = ""

    def describe(self, lookup=None) -> str:
        return "with at least one value above 0"

    def violation(self, value, lookup=lambda name: None) -> str | None:
        values = list(_numbers(value))
        return None if not values or any(v > 0 for v in values) else self.describe()


RULES = (Range, NotAllZero)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(value):
    """The numbers a rule applies to: the value itself, or a list's elements / a mapping's values."""
    if _number(value):
        yield value
    elif isinstance(value, (list, tuple)):
        yield from (v for v in value if _number(v))
    elif isinstance(value, dict):
        yield from (v for v in value.values() if _number(v))


# ---- the schema: type hints of the configurable (and of the dataclass it returns) -----------

def _configurable(selector: str):
    from gin import config as gc

    try:
        return gc._REGISTRY.get_match(selector)  # gin's registry: no public lookup by selector
    except Exception:
        return None


def schema(selector: str) -> dict[str, Any]:
    """{parameter: type hint (Annotated kept)} for the configurable `selector`."""
    c = _configurable(selector)
    if c is None:
        return {}
    fn = c.wrapped
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an unresolvable annotation: check nothing rather than guess
        return {}
    ret = hints.pop("return", None)
    if dataclasses.is_dataclass(ret):
        try:
            fields = typing.get_type_hints(ret, include_extras=True)
        except Exception:
            fields = {}
        for name, hint in fields.items():
            if name in hints and _ranges(hint) and not _ranges(hints[name]):
                hints[name] = typing.Annotated[hints[name], *_ranges(hint)]
    return hints


def _ranges(hint) -> list:
    """The rules (`Range`, `NotAllZero`) annotated on `hint`, also inside `X | None`."""
    if typing.get_origin(hint) is typing.Annotated:
        return [m for m in hint.__metadata__ if isinstance(m, RULES)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [r for a in typing.get_args(hint) for r in _ranges(a)]
    return []


def _strip(hint):
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


# ---- checking one value ----------------------------------------------------------------------

def _describe(hint) -> str:
    hint = _strip(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "True or False"
    if hint is str:
        return "a quoted string"
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        elem = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        return "a list" + (f" (each {_describe(elem)})" if elem is not None else "")
    if origin in (dict, collections.abc.Mapping):
        return f"a dict ({_describe(args[0])} -> {_describe(args[1])})" if len(args) == 2 else "a dict"
    return getattr(hint, "__name__", str(hint))


def _matches(value, hint) -> bool | None:
    """True / False, or None when the hint is not one we check (then the value passes)."""
    hint = _strip(hint)
    if hint is Any or hint is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in args]
        return True if any(r is True for r in results) else (None if None in results else False)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if isinstance(value, str) and origin is collections.abc.Sequence:
            return True  # a single string where a sequence is allowed (the configurable wraps it)
        if not isinstance(value, (list, tuple)):
            return False
        elem = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        if elem is None:
            return None
        results = [_matches(v, elem) for v in value]
        return False if False in results else (True if results else True)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            results = [_matches(k, args[0]) for k in value] + [_matches(v, args[1]) for v in value.values()]
            return False not in results
        return True
    return None


def _gin_literal(value) -> bool:
    """False for what gin resolves at call time (references, macros)."""
    from gin import config as gc

    if isinstance(value, (gc.ConfigurableReference, gc.ConfigurableReference.__class__)):
        return False
    if type(value).__name__ in ("ConfigurableReference", "_UnknownConfigurableReference", "Macro"):
        return False
    if isinstance(value, (list, tuple)):
        return all(_gin_literal(v) for v in value)
    if isinstance(value, dict):
        return all(_gin_literal(v) for v in value.values())
    return True


def check_value(key: str, value, hint, lookup=lambda name: None) -> None:
    """`value` bound to `key` against `hint`: its type, then its rules (`Range`, `NotAllZero`;
    `lookup(name)` gives a value a bound names). An error is a ConfigError; a rule with `warn`
    logs a warning."""
    ok = _matches(value, hint)
    if ok is False:
        expected = _describe(hint)
        kind = type(value).__name__
        got = f"the string {value!r}" if isinstance(value, str) else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        hint_text = ""
        if isinstance(value, str) and _numeric(value) is not None and _matches(_numeric(value), hint):
            hint_text = f" (drop the quotes: {key}={value})"
        elif isinstance(value, float) and value.is_integer() and _matches(int(value), hint):
            hint_text = f" (write {key}={int(value)})"
        raise ConfigError(f"{key} = {value!r}: expected {expected}, got {got}{hint_text}")
    if ok:
        check_rules(key, value, hint, lookup)


def check_rules(key: str, value, hint, lookup=lambda name: None) -> None:
    """The rules annotated on `hint` against `value` (the value's type already checked)."""
    for r in _ranges(hint):
        bad = r.violation(value, lookup)
        if bad is None:
            continue
        if isinstance(r, Range) and isinstance(value, (list, tuple, dict)):
            bad = f"with every {'value' if isinstance(value, dict) else 'element'} {bad}"
        line = f"{key} = {value!r}: expected {_describe(_value_hint(hint, value))} {bad}"
        if not r.warn:
            raise ConfigError(line)
        logging.getLogger("meditron_jax").warning(f"{line}: {r.warn}")


def _value_hint(hint, value):
    """The branch of a `X | None` hint that `value` matched (for the message: "a number", not
    "a number or None")."""
    hint = _strip(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for a in typing.get_args(hint):
            if a is not type(None) and _matches(value, a):
                return a
    return hint


def _numeric(s: str):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    if s in ("True", "False"):
        return s == "True"
    return None


# ---- the whole bound configuration -----------------------------------------------------------

def check_bindings(selectors=CHECKED) -> None:
    """Every bound value of the given configurables against their schema, then the rules of
    every parameter (bound or default: `optimizer.warmup_steps`' default against a bound
    `train.steps`); the first bad one raises a one-line ConfigError. Call after gin parsed,
    before any configurable runs."""
    import inspect

    from gin import config as gc

    bound = {}  # (scope, name) -> {param: value}
    for (scope, selector), params in gc._CONFIG.items():
        c = _configurable(selector)
        name = c.name if c is not None else selector.rsplit(".", 1)[-1]
        if name in selectors:
            bound[(scope or "", name)] = params
    for name in selectors:
        if _configurable(name) is not None:
            bound.setdefault(("", name), {})

    def value_of(scope: str, name: str, param: str):
        """The literal gin gives `name.param` in `scope` (bound, else the default), or None."""
        for params in (bound.get((scope, name), {}), bound.get(("", name), {})):
            if param in params:
                return params[param] if _gin_literal(params[param]) else None
        c = _configurable(name)
        try:
            default = inspect.signature(c.wrapped).parameters[param].default if c is not None else None
        except (KeyError, TypeError, ValueError):
            return None
        return None if default is inspect.Parameter.empty or default is gc.REQUIRED else default

    for (scope, name), params in sorted(bound.items()):
        def lookup(ref: str, scope=scope, name=name):  # "optimizer.lr", or "lr" of this configurable
            return value_of(scope, *(ref.split(".", 1) if "." in ref else (name, ref)))

        for param, hint in schema(name).items():
            key = f"{scope + '/' if scope else ''}{name}.{param}"
            if param in params:
                if _gin_literal(params[param]):
                    check_value(key, params[param], hint, lookup)
            elif _ranges(hint):
                value = value_of(scope, name, param)
                if value is not None:
                    check_rules(key, value, hint, lookup)


# ---- gin's parse errors, explained -----------------------------------------------------------

_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching '([^']+)'")
_UNKNOWN_PARAM = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_PARSE_FAILURE = ("malformed node or string", "Unable to parse value", "Failed to parse token",
                  "EOF in multi-line", "invalid syntax", "unterminated string")


def known_selectors() -> list[str]:
    from gin import config as gc

    names = set()
    for selector, _ in gc._REGISTRY.items():
        names.add(selector)
        names.add(selector.rsplit(".", 1)[-1])
    return sorted(names)


def parameters(selector: str) -> list[str]:
    import inspect

    c = _configurable(selector)
    if c is None:
        return []
    try:
        return [p for p in inspect.signature(c.wrapped).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
        return []


def _closest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unquoted_value(binding: str) -> str | None:
    """The value of `key=value` when it is a bare word or path that gin cannot parse (it wanted
    quotes), else None."""
    if "=" not in binding:
        return None
    value = binding.split("=", 1)[1].strip()
    if not value or value[0] in "'\"[({@%" or value in ("True", "False", "None") or _numeric(value) is not None:
        return None
    return value


def explain_parse_error(message: str, gin_params=()) -> str:
    """gin's error message -> one line with a hint (no 'gin:' prefix added here)."""
    msg = " ".join(str(message).split())
    m = _UNKNOWN_PARAM.search(msg)
    if m:
        selector, param = m.groups()
        close = difflib.get_close_matches(param, parameters(selector), n=1, cutoff=0.6)
        suggestion = f"; did you mean '{selector}.{close[0]}'?" if close else ""
        return (f"unknown parameter '{selector}.{param}'{suggestion}"
                f" ({msg.split('. ', 1)[1] if '. ' in msg else ''})").replace(" ()", "")
    m = _UNKNOWN_CONFIGURABLE.search(msg)
    if m:
        name = m.group(1)
        where = msg.split(". ", 1)[1] if ". " in msg else ""
        return f"unknown configurable '{name}'{_closest(name, known_selectors())}" + (f" ({where})" if where else "")
    if any(s in msg for s in _PARSE_FAILURE):
        for binding in gin_params:
            value = unquoted_value(binding)
            if value is not None:
                key = binding.split("=", 1)[0].strip()
                return (f"cannot parse --gin_param {binding!r}: strings need quotes, e.g. "
                        f"--gin_param \"{key}='{value}'\"")
        return msg + " (strings need quotes: key='value')"
    return msg
