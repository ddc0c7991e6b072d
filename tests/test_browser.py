"""The page in a real headless Chromium (Debian's, which .ci/run installs), driven by Playwright.

Log in, generate, rank with the keyboard (digits, t, Backspace), submit with Enter, see the losses,
judge blind A/B pairs with the keyboard (left arrow, =, right arrow), download a dataset and load it. A screenshot of each tab lands in ``test-output/browser/``.
"""

import shutil
from pathlib import Path

import datasets
import pytest

from tests.conftest import PROMPT, nudged_version
from workbench.api import RoomAPI
from workbench.auth import Users, add_user
from workbench.room import ControlRoom, RoomConfig
from workbench.ui import serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "browser"
# Flags for a closed network: without the background-networking ones Chromium keeps dialling out.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page's address and the room behind it."""
    folder = tmp_path_factory.mktemp("browser")
    add_user(folder / "users.yaml", "alice", "alice-password", role="admin", level=3)
    room = ControlRoom(workdir=folder / "run", config=RoomConfig(survivors=4, batch_size=4, max_draws=8, steps=4),
                       auto_register=False)
    page = serve(RoomAPI(room, Users(folder / "users.yaml")), block=False)
    yield page.local_url, room
    page.close()


def test_log_in_generate_rank_with_the_keyboard_see_losses_verify_download(served, tmp_path):
    url, room = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        page.set_default_timeout(90_000)
        page.goto(url)
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("alice-password")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("text=Signed in as")
        assert "Signed in as alice (admin, level 3)" in page.inner_text("body")

        page.get_by_label("Prompt").first.fill(PROMPT)
        page.click("#rank-generate")
        page.wait_for_selector("#rank-pick-3", state="visible")
        order = page.locator("#rank-order")
        assert "Still to place: 1, 2, 3, 4" in order.inner_text()

        page.get_by_label("Prompt").first.press("t")  # typing in a text field is not a shortcut
        assert "nothing yet" in order.inner_text()
        page.locator("h2").first.click()  # focus back on the page
        # 2, then 4, tie 4 with 2, undo (4 back out), then 3, 4, 1
        for key, shown in [("2", "first: 2 Still to place: 1, 3, 4"), ("4", "first: 2 › 4 Still"),
                           ("t", "first: 2 = 4 Still"), ("Backspace", "first: 2 Still to place: 1, 3, 4"),
                           ("3", "first: 2 › 3 Still"), ("4", "first: 2 › 3 › 4 Still"), ("1", "first: 2 › 3 › 4 › 1 Still")]:
            page.keyboard.press(key)
            page.wait_for_function(
                "(shown) => document.getElementById('rank-order').innerText.replace(/\\s+/g, ' ').includes(shown)", arg=shown)
        page.keyboard.press("3")  # already placed: nothing changes
        page.keyboard.press("t")  # ties 1 with 4
        page.wait_for_function("() => document.getElementById('rank-order').innerText.includes('4 = 1')")
        page.locator("#rank-rating-1").get_by_label("3").check()  # candidate 2 rated 3
        page.locator("h2").first.click()
        page.screenshot(path=str(SHOTS / "rank.png"), full_page=True)
        page.keyboard.press("Enter")
        page.wait_for_selector("text=Ranking stored")
        page.keyboard.press("Enter")  # pressed twice: nothing more to store, and no error
        page.wait_for_selector("text=is answered already")
        assert "already ranked" not in page.inner_text("body")

        page.get_by_role("tab", name="Optimize").click()
        page.wait_for_selector("text=GRPO: loss")
        optimize = page.inner_text("body")
        assert "DPO: loss 0.6931" in optimize and "ratio" in optimize
        page.screenshot(path=str(SHOTS / "optimize.png"), full_page=True)

        page.get_by_role("tab", name="Models").click()
        page.wait_for_selector("text=Compare on the same seeds")
        page.get_by_role("button", name="Roll back").click()  # to the version that is current: says so
        page.wait_for_selector("text=v0 was current already: nothing changed.")
        page.screenshot(path=str(SHOTS / "models.png"), full_page=True)

        assert nudged_version(room) == "v1"  # a second version to verify against its parent, v0
        page.get_by_role("tab", name="Verify").click()  # opening the tab draws the first pair
        status = "document.getElementById('verify-status').innerText"
        for key, shown in [("ArrowLeft", "Pair 1 "), ("=", "Pair 2 "), ("ArrowRight", "Pair 3 "), (None, "Pair 4 ")]:
            page.wait_for_function(f"(shown) => {status}.includes(shown)", arg=shown)
            if key:  # focus is still on the tab: the arrows judge, they do not switch tabs
                page.keyboard.press(key)
        page.click("#verify-results")
        page.wait_for_function("() => /all experts\\s+all\\s+3\\s/.test(document.getElementById('verify-table').innerText)")
        assert "v0 → v1" in page.inner_text("#verify-table")
        page.screenshot(path=str(SHOTS / "verify.png"), full_page=True)

        # after another update the tab compares the new current version with its parent, not v0 with v1
        page.get_by_role("tab", name="Experts").click()
        assert nudged_version(room) == "v2"
        page.get_by_role("tab", name="Verify").click()
        expect = playwright.expect
        expect(page.get_by_label("Compare version (default: the current one's parent)")).to_have_value("v1")
        expect(page.get_by_label("with version (default: the current one)")).to_have_value("v2")

        page.get_by_role("tab", name="Experts").click()
        page.wait_for_selector("text=Rankings per expert")
        page.screenshot(path=str(SHOTS / "experts.png"), full_page=True)

        page.get_by_role("tab", name="Data").click()
        page.wait_for_selector("text=1 ranked")
        page.click("#export")
        link = page.locator("#export-file a").first
        link.wait_for()
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        page.screenshot(path=str(SHOTS / "data.png"), full_page=True)
        browser.close()

    rows = datasets.load_dataset("parquet", data_files=str(saved), split="train")
    # tiers 2 > 3 > 4 = 1: five decided pairs and one tie, all from alice at level 3
    assert len(rows) == 6 and sorted(zip(rows["label_0"], rows["label_1"])).count((0.5, 0.5)) == 1
    assert set(rows["expert_level"]) == {3}
    assert sorted(p.name for p in SHOTS.glob("*.png")) == ["data.png", "experts.png", "models.png", "optimize.png", "rank.png",
                                                           "verify.png"]
    # left, same, right: the stored verdicts name the version that was on that side
    judged = room.store.ab_judgements()
    assert [(j["expert"], j["version_a"], j["version_b"]) for j in judged] == [("alice", "v0", "v1")] * 3
    other = {"a": "b", "b": "a"}
    assert [j["verdict"] for j in judged] == [judged[0]["left"], "same", other[judged[2]["left"]]]
