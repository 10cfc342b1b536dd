"""The shift-stress suite's images do not depend on how many threads make them."""

from __future__ import annotations

import numpy as np

from core.preprocess import PreprocessConfig
from harness.payloads import sample_xrays
from training.stress import stressed_logits


def test_stressed_images_are_the_same_with_one_thread_or_several() -> None:
    paths = sample_xrays(3, offset=11)  # three of each class
    names = ["clean", "noise (sigma 8)", "random acquisition mix", "rotate +7 deg"]  # three of them draw randomness

    def fingerprint(grids: np.ndarray) -> np.ndarray:  # one number per image that any changed pixel moves
        return (grids.astype(np.float64) * np.arange(1, grids[0].size + 1).reshape(grids[0].shape)).sum(axis=(1, 2))

    one = stressed_logits(fingerprint, paths, PreprocessConfig(), names, batch_size=4, workers=1)
    several = stressed_logits(fingerprint, paths, PreprocessConfig(), names, batch_size=4, workers=4)
    assert list(several) == names == list(one)
    for name in names:
        assert one[name].shape == (6,) and np.array_equal(one[name], several[name]), name
    assert not np.array_equal(one["clean"], one["noise (sigma 8)"])  # the stresses did change the images
