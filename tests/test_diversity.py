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


def test_the_optimize_tab_states_the_probe_against_the_base():
    from workbench.ui import probe_text

    probe = {"candidates": 16, "pass_rate_base": 1.0, "pass_rate_trained": 0.9375, "diversity_base": 0.08,
             "diversity_trained": 0.07}
    assert probe_text(probe) == ("\n\nOn 16 fixed seeds against the base model: the selector passes 94% (base 100%); the "
                                 "candidates of a prompt differ 0.070 from one another (base 0.080, -12%).")
    assert probe_text({**probe, "diversity_base": None, "diversity_trained": None}).endswith("passes 94% (base 100%).")
    assert probe_text(None) == ""
