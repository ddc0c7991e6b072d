"""The first page: served in-process, called over HTTP with gradio_client like any client would."""

import pytest
from gradio_client import Client

from workbench.ui import build_page


@pytest.fixture(scope="module")
def served(policy):
    page = build_page(policy)
    page.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield Client(page.local_url, verbose=False)
    page.close()


def test_generate_endpoint_returns_candidates(served):
    gallery, status = served.predict("MRI: axial brain", 2, 0, 5, 5.0, api_name="/generate")
    assert len(gallery) == 2
    assert "seed" in gallery[0]["caption"] and "mean log-prob" in gallery[0]["caption"]
    assert status.startswith("2 candidates from version")


def test_generate_endpoint_explains_bad_input(served):
    with pytest.raises(Exception, match="prompt is empty"):
        served.predict("", 2, 0, 5, 5.0, api_name="/generate")
