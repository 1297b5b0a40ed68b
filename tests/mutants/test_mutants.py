"""Every planted bug of ``planted.py`` is caught by the conformance suite (``tox -e
mutants``): the suite, run on the mutant as on any third-party backend, reports at
least one failure, unless the mutant is listed as equivalent within rounding."""

import warnings

import pytest
from mutants.planted import EQUIVALENT, MUTANTS

from bn1d.conformance import golden
from bn1d.conformance.runner import run_suite


@pytest.fixture(scope="module")
def vectors():
    return golden.load()


def test_there_are_enough_mutants():
    assert len(MUTANTS) >= 30 and set(EQUIVALENT) <= set(MUTANTS)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_suite_kills_the_mutant(name, vectors):
    bug, make = MUTANTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mutants' NaN and overflow warnings
        checks = run_suite([make()], vectors)
    killers = [c.case for c in checks if c.passed is False]
    if name in EQUIVALENT:
        assert not killers, f"{name} is listed as equivalent ({EQUIVALENT[name]}) but fails {killers}"
        return
    print(f"\n{name} ({bug}): killed by {len(killers)} cases, e.g. {killers[:4]}")
    assert killers, f"mutant {name} ({bug}) survives the suite"
