"""The named SQL blocks are checked when they load: every name the store runs, no other, none twice."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import get_args

import pytest

from consumer.store.sql import QueryFileError, QueryName, parse, queries


def shipped() -> str:
    return resources.files("consumer.sql").joinpath("queries.sql").read_text()


def test_the_shipped_file_has_exactly_the_names_the_store_runs() -> None:
    assert set(parse(shipped())) == set(get_args(QueryName)) == set(queries())


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda text: text.replace("-- name: db_now", "-- name: db_clock"), "missing: db_now"),
        (lambda text: text + "\n-- name: db_now\nSELECT now();\n", "named twice: db_now"),
        (lambda text: text + "\n-- name: drop_everything\nSELECT 1;\n", "not in QueryName: drop_everything"),
        (lambda text: text.replace("-- name: db_now\nSELECT now();", "-- name: db_now\n"), "empty: db_now"),
    ],
)
def test_a_broken_file_fails_at_load_naming_the_block(edit: Callable[[str], str], problem: str) -> None:
    with pytest.raises(QueryFileError, match=problem):
        parse(edit(shipped()))
