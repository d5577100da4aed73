"""Vectorized encoding equals SearchSpace.encode, and rejects archs from another space."""

import numpy as np
import pytest

from enas4d.encoding import encode_many
from enas4d.space import SearchSpace

SPACES = [SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32)),
          SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32)).restrict(stages=1),
          SearchSpace(units=3, resolutions=(8, 12), depths=(1, 3), kernels=(5, 3), stages=2)]


@pytest.mark.parametrize("space", SPACES)
def test_equals_space_encode(space: SearchSpace) -> None:
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(300)] + [space.largest_multistage(), space.smallest_multistage()]
    np.testing.assert_array_equal(encode_many(space, archs), np.stack([space.encode(a) for a in archs]))
    assert encode_many(space, []).shape == (0, space.encoding_size)


def test_rejects_archs_outside_the_space() -> None:
    space = SPACES[0]
    with pytest.raises(ValueError, match="stages"):
        encode_many(space, [SPACES[1].sample(np.random.default_rng(0))])
    with pytest.raises(ValueError, match="resolution 64"):
        big = space.restrict(resolutions=(64,)).largest_multistage()
        encode_many(SearchSpace(units=5, resolutions=(16, 20)), [big])
    with pytest.raises(ValueError, match="kernel 7"):
        encode_many(space.restrict(kernels=(3, 5)), [space.largest_multistage()])
