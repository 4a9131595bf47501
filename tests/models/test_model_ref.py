"""The one model reference that crosses the serving route: validated once, round-trips."""

from __future__ import annotations

import re

import pytest

from models.model_ref import ModelRef

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("churn@champion", ModelRef("churn", alias="champion")),
        ("churn/3", ModelRef("churn", version="3")),
        ("my.model-2@blue_green-1", ModelRef("my.model-2", alias="blue_green-1")),
    ],
)
def test_parse_and_str_round_trip(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref
    assert str(ref) == text
    assert ModelRef.parse(str(ref)) == ref


def test_selector_says_which_one() -> None:
    assert ModelRef("churn", alias="champion").selector == "@champion"
    assert ModelRef("churn", version="3").selector == "version 3"


def test_frozen_and_hashable() -> None:
    ref = ModelRef("churn", alias="champion")
    with pytest.raises(AttributeError):
        ref.alias = "challenger"  # type: ignore[misc]
    assert {ref, ModelRef.parse("churn@champion")} == {ref}


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: ModelRef("churn", alias="champion", version="1"), "not both"),
        (lambda: ModelRef("churn"), "give an alias or a version"),
        (lambda: ModelRef("churn", version="v3"), "positive integer, got 'v3'"),
        (lambda: ModelRef("churn", version=""), "positive integer, got ''"),
        (lambda: ModelRef("churn", alias=""), "alias '' of model 'churn'"),
        (lambda: ModelRef("churn", alias="a/b"), "alias 'a/b'"),
        (lambda: ModelRef("", alias="champion"), "model name ''"),
        (lambda: ModelRef("ch urn", version="1"), "model name 'ch urn'"),
        (lambda: ModelRef.parse("churn"), "names no alias or version"),
        (lambda: ModelRef.parse("churn@"), "alias ''"),
        (lambda: ModelRef.parse("@champion"), "model name ''"),
        (lambda: ModelRef.parse("churn/"), "got ''"),
        (lambda: ModelRef.parse("churn/3@champion"), "model name 'churn/3'"),
    ],
)
def test_bad_reference_is_a_value_error_naming_the_problem(build, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        build()
