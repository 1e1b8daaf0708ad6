"""The examples in the docstrings run and print what they say."""

import doctest

import pytest

import compeft_rs
import compeft_rs._tensor


@pytest.mark.parametrize("module", [compeft_rs, compeft_rs._tensor])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_flower_docstring_example():
    pytest.importorskip("flwr")
    import compeft_rs.flower

    result = doctest.testmod(compeft_rs.flower, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
