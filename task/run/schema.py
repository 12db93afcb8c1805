"""Declared config keys: a key's type and range (``Field``), and each strategy's keys.

Strategy modules declare their keys here on import (``register_strategy_schema``); the config
module (task/run/config.py) validates a composed config against them. Nothing here imports a
strategy, so a strategy can import this module without an import circle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One config key's declared type and valid range (bounds inclusive unless *_open)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.kind in (str, bool, list):
            return f"a {self.kind.__name__}" + (" or null" if self.nullable else "")
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        finite = "finite " if self.kind is float else ""
        null = " or null" if self.nullable else ""
        return f"{finite}{self.kind.__name__} in {lo}{low}, {high}{hi}{null}"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices is not None:
            return value in self.choices
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool) != (self.kind is bool):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False  # nan / inf pass every range check and poison every update
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )


class Sizes(Field):
    """A positive integer or a non-empty list of them (layer widths)."""

    def __init__(self) -> None:
        super().__init__(int, 1)

    def describe(self) -> str:
        return "an int >= 1 or a non-empty list of them"

    def accepts(self, value: Any) -> bool:
        values = value if isinstance(value, list) else [value]
        return bool(values) and all(Field.accepts(self, v) for v in values)


class Mapping(Field):
    """A mapping of keyword arguments (``{hidden: 64}``), or null."""

    def __init__(self) -> None:
        super().__init__(dict, nullable=True)

    def describe(self) -> str:
        return "a mapping such as {hidden:64}, or null"


Schema = dict[str, Field]

POSITIVE = Field(float, 0.0, low_open=True)
FRACTION = Field(float, 0.0, 1.0, low_open=True)
COUNT = Field(int, 1)
VAL_FRACTION = Field(float, 0.0, 1.0, high_open=True)

# strategy name -> its declared keys (filled by each strategy module on import)
STRATEGY_SCHEMAS: dict[str, Schema] = {}


def register_strategy_schema(name: str, schema: Schema) -> None:
    """Declare a strategy's config keys (called by each strategy module)."""
    STRATEGY_SCHEMAS[name] = {"name": Field(str), **schema}
