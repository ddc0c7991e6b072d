"""The variety measure the learning benchmark reports and the control room guards (``data.diversity``)."""

import math

import numpy as np
from PIL import Image

from data.diversity import diversity, grey_levels


def flat(level: float) -> np.ndarray:
    return np.full((2, 2), level, dtype=np.float32)


def test_diversity_is_the_mean_rms_distance_over_every_pair_of_each_prompts_images():
    # one prompt: 0 and 0.5 differ by 0.5; another: 0, 0.1 and 0.3 pairwise 0.1, 0.3 and 0.2; a third has one image
    groups = [[flat(0.0), flat(0.5)], [flat(0.0), flat(0.1), flat(0.3)], [flat(0.9)]]
    assert diversity(groups) == np.float32(0.5 + 0.1 + 0.3 + 0.2) / 4  # pairs, not prompts, weigh equally: 0.275
    checkerboard = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert diversity([[checkerboard, 1 - checkerboard]]) == 1.0 and diversity([[checkerboard, checkerboard]]) == 0.0
    assert math.isnan(diversity([[flat(0.2)], []]))  # no pair: nothing to measure


def test_grey_levels_are_the_luminance_in_unit_range():
    image = Image.fromarray(np.array([[0, 255], [51, 102]], dtype=np.uint8))
    assert np.allclose(grey_levels(image), [[0.0, 1.0], [0.2, 0.4]])
    assert grey_levels(Image.new("RGB", (1, 1), (255, 255, 255)))[0, 0] == 1.0
