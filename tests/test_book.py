"""bnutils.glue: the notebooks' only way to put numbers into prose."""
import pytest

import bnutils as bn


@pytest.mark.parametrize("value", [3.14159, 2, None])
def test_glue_rejects_unformatted_values(value):
    with pytest.raises(TypeError, match="Format it first"):
        bn.glue("x", value)


def test_glue_rejects_bad_names():
    with pytest.raises(TypeError, match="non-empty str"):
        bn.glue("", "1.0")
