"""Shared fixtures: the embedded default model, loaded once per test session."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from optim.policy import Policy  # noqa: E402

PROMPT = "OCT: retinal layers with subretinal fluid"
FAST = dict(steps=4, guidance=5.0, eta=1.0)  # few steps keep the suite quick; the math is per step


@pytest.fixture(scope="session")
def policy():
    return Policy.load()
