"""AOT compilation cases, one module per kernel family (tier 3 of DESIGN.md).

Each module ``tests/aot_cases/<family>.py`` defines ``cases()``, yielding a :class:`._case.Case`
for every kernel specialisation the family's launchers produce (or a covering set), its most
representative launches first (the smoke subset README's command compiles). Families are listed
here explicitly, one line each; ``python -m tests.aot_compile`` compiles them.
"""

from __future__ import annotations

import importlib
import itertools
from types import ModuleType

from ._case import Case

# family -> module of its cases; one line per family.
FAMILIES: dict[str, str] = {
    "bce": "tests.aot_cases.bce",
    "cross_entropy": "tests.aot_cases.cross_entropy",
    "ctc": "tests.aot_cases.ctc",
    "distill": "tests.aot_cases.distill",
    "embedding": "tests.aot_cases.embedding",
    "kl_div": "tests.aot_cases.kl_div",
    "logprobs": "tests.aot_cases.logprobs",
    "margin": "tests.aot_cases.margin",
    "multi_margin": "tests.aot_cases.multi_margin",
    "regression": "tests.aot_cases.regression",
    "softmax": "tests.aot_cases.softmax",
}

# Cases per family in the smoke subset (the first ones a family's ``cases()`` yields).
SMOKE_PER_FAMILY = 1


def family(name: str) -> ModuleType:
    """The cases module of family ``name``."""
    return importlib.import_module(FAMILIES[name])


def family_cases(name: str) -> list[Case]:
    """The cases of family ``name``, in the order its ``cases()`` yields them."""
    return list(family(name).cases())


def all_cases() -> dict[str, Case]:
    """Every family's cases by key (a case two families list is compiled once).

    Raises:
        ValueError: two different cases share a key.
    """
    out: dict[str, Case] = {}
    for name in FAMILIES:
        for c in family_cases(name):
            if out.setdefault(c.key, c) != c:
                raise ValueError(f"two different AOT cases are named {c.key}")
    return out


def smoke_cases() -> dict[str, Case]:
    """The first ``SMOKE_PER_FAMILY`` cases of every family, by key (built without the others)."""
    return {c.key: c for name in FAMILIES for c in itertools.islice(family(name).cases(), SMOKE_PER_FAMILY)}


def smoke_keys() -> list[str]:
    """The keys of :func:`smoke_cases`."""
    return list(smoke_cases())
