"""Which registered model to serve: a model name and exactly one of an alias or a version.

`churn@champion` names whatever version holds `@champion` when it is resolved; `churn/3`
names version 3. A `ModelRef` is built once where the choice is made (`mlgate serve`, the
canary controller, `serving.model` in the config) and carried unchanged to the service and
the model store, so "an alias or a version, not both" is checked in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

# The pattern of `registry.model_name`.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# MLflow's rule for alias names: nothing else can hold a version.
_ALIAS = re.compile(r"[\w-]+")
_VERSION = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ModelRef:
    """`ModelRef("churn", alias="champion")` or `ModelRef("churn", version="3")`;
    `ModelRef.parse(str(ref)) == ref`. A bad reference is a ValueError naming the problem."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"model name {self.name!r}: use letters, digits, '.', '_' or '-' (at least one)"
            )
        if self.alias is not None and self.version is not None:
            raise ValueError(
                f"model {self.name!r}: give an alias or a version, not both "
                f"(alias {self.alias!r}, version {self.version!r})"
            )
        if self.alias is None and self.version is None:
            raise ValueError(f"model {self.name!r}: give an alias or a version")
        if self.alias is not None and not (
            isinstance(self.alias, str) and _ALIAS.fullmatch(self.alias)
        ):
            raise ValueError(
                f"alias {self.alias!r} of model {self.name!r}: use letters, digits, '_' or '-' "
                "(at least one)"
            )
        if self.version is not None and not (
            isinstance(self.version, str) and _VERSION.fullmatch(self.version)
        ):
            raise ValueError(f"model version must be a positive integer, got {self.version!r}")

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """`NAME@ALIAS` or `NAME/VERSION`."""
        if not isinstance(text, str):
            raise ValueError(f"a model reference is a string NAME@ALIAS or NAME/VERSION: {text!r}")
        name, at, alias = text.partition("@")
        if at:
            return cls(name, alias=alias)
        name, slash, version = text.partition("/")
        if slash:
            return cls(name, version=version)
        raise ValueError(
            f"model reference {text!r} names no alias or version: write NAME@ALIAS or "
            "NAME/VERSION (e.g. churn@champion, churn/3)"
        )

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}"

    @property
    def selector(self) -> str:
        """The alias or version alone, as a person reads it: `@champion` or `version 3`."""
        return f"@{self.alias}" if self.alias is not None else f"version {self.version}"

    # A config field of this type reads `NAME@ALIAS` / `NAME/VERSION` and writes it back.
    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._coerce, serialization=core_schema.to_string_ser_schema()
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "examples": ["churn@champion", "churn/3"]}

    @classmethod
    def _coerce(cls, value: Any) -> ModelRef:
        return value if isinstance(value, ModelRef) else cls.parse(value)
