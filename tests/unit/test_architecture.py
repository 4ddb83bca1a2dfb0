"""docs/architecture.md names every module of ``consumer``, and only modules that exist."""

from __future__ import annotations

import pkgutil
import re

import consumer

from ..helpers.config import ROOT

DOC = ROOT / "docs" / "architecture.md"


def documented() -> set[str]:
    """Every ``consumer.*`` name the page writes as code."""
    return set(re.findall(r"`(consumer(?:\.\w+)+)`", DOC.read_text()))


def modules() -> set[str]:
    """Every module and subpackage of ``consumer``, subpackages walked."""
    return {info.name for info in pkgutil.walk_packages(consumer.__path__, "consumer.")}


def test_every_module_named_in_the_architecture_page_exists() -> None:
    extra = sorted(documented() - modules())
    assert not extra, f"docs/architecture.md names modules that do not exist: {', '.join(extra)}"


def test_every_module_of_consumer_is_named_in_the_architecture_page() -> None:
    missing = sorted(modules() - documented())
    assert not missing, f"docs/architecture.md does not name these modules of consumer: {', '.join(missing)}"
