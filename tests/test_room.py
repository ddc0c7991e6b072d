"""The control room end to end in Python: generate, rank, losses, update, sample, versions, rollback, export, restart."""

import io
import math
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pydicom
import pytest

from optim.preference.rewards import RankingError
from workbench import ControlRoom, RoomConfig
from tests.conftest import PROMPT

CONFIG = RoomConfig(survivors=3, batch_size=3, max_draws=6, steps=4)


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def test_a_round_from_generate_to_export_and_a_restart_that_loses_nothing(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    group = room.generate(PROMPT, seed=1)
    assert group.version == "v0" and len(group.survivors) == 3 and group.message.startswith("3 of 3 candidates passed")
    a, b, c = (s.id for s in group.survivors)
    with pytest.raises(RankingError, match="unknown candidates: nope"):
        room.rank(group.id, [[a], [b, c, "nope"]], expert="alice")
    room.rank(group.id, [[c], [a, b]], expert="alice", ratings={c: 3, a: 2, b: 1}, seconds=4.2)

    numbers = room.losses(group.id)
    assert [x["ratio"] for x in numbers["grpo"]["candidates"]] == [1.0, 1.0, 1.0]
    assert numbers["dpo"]["loss"] == pytest.approx(math.log(2)) and len(numbers["dpo"]["pairs"]) == 2

    result = room.apply_update(algorithm="dpo", who="alice")
    assert result.applied and result.version.id == "v1", result.message
    assert [v["id"] for v in room.versions() if v["current"]] == ["v1"]
    assert room.store.updates()[-1]["applied"] and room.store.unused_ranked_groups() == []
    with pytest.raises(ValueError, match="no ranked groups to learn from yet"):
        room.apply_update()

    new, base = room.sample(PROMPT, n=2, seed=9, version="v1"), room.sample(PROMPT, n=2, seed=9, version="v0")
    assert np.abs(pixels(new) - pixels(base)).max() > 0  # the update changed the images
    assert room.policy.version == "v1"  # sampling another version leaves the current one in place

    parquet = room.export("pickapic", tmp_path / "out" / "prefs.parquet")
    rows = datasets.load_dataset("parquet", data_files=str(parquet), split="train")
    # jpg_0 is the candidate drawn first: c (drawn last) won both decided pairs, and a/b is a tie
    assert len(rows) == 3 and sorted(zip(rows["label_0"], rows["label_1"])) == [(0.0, 1.0), (0.0, 1.0), (0.5, 0.5)]

    room.rollback("v0")
    assert [v["id"] for v in room.versions() if v["current"]] == ["v0"]
    pending = room.generate(PROMPT, seed=2)
    room.store.close()

    again = ControlRoom(workdir=tmp_path, config=CONFIG)
    assert again.policy.version == "v0" and again.store.get_group(pending.id)["status"] == "pending"
    assert [r["tiers"] for r in again.store.rankings(group.id)] == [[[c], [a, b]]]
    # back on the weights that drew the group: its stored chains re-score to a ratio of exactly 1 again
    assert [x["ratio"] for x in again.losses(group.id)["grpo"]["candidates"]] == [1.0, 1.0, 1.0]


def test_a_group_with_no_survivor_is_stored_and_says_why(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    room.sampler.selector.config.quality_threshold = 1.01  # nothing can pass
    group = room.generate(PROMPT, seed=3)
    assert group.survivors == [] and len(group.rejected) == 6
    assert group.message.startswith("only 0 of the 3 wanted candidates passed the selector: the budget of 6 draws is spent")
    assert all(r.reasons[-1].endswith("below 1.01") for r in group.rejected)
    with pytest.raises(ValueError, match=f"group {group.id} has no candidate that passed the selector"):
        room.losses(group.id)


def test_import_keeps_good_rows_reports_bad_ones_and_exports_no_patient_tag(tmp_path):
    demo = Path(__file__).resolve().parent.parent / "data" / "demo" / "images"
    archive = tmp_path / "ratings.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(demo / "0001.dcm", "scans/0001.dcm")
        zipped.write(demo / "0000.png", "scans/0000.png")
        zipped.writestr("ratings.csv", "image_path,rating,modality,expert_level,prompt\n"
                        "scans/0001.dcm,3,MRI,2,MRI: axial brain\n"
                        "scans/0000.png,7,OCT,1,OCT: retinal layers\n"
                        "scans/missing.png,2,OCT,1,OCT: retinal layers\n"
                        "scans/0000.png,1,OCT,3,OCT: retinal layers\n")
    room = ControlRoom(workdir=tmp_path / "run", config=CONFIG)
    report = room.import_ratings(archive, imported_by="alice")
    assert report["imported"] == 2 and report["rejected_rows"] == 2
    assert report["errors"][0].startswith("row 3: rating:") and report["errors"][1].startswith("row 4: image_path:")
    assert room.counts()["imported_per_modality"] == {"MRI": 1, "OCT": 1}

    exported = room.export("ratings_csv", tmp_path / "ratings-out.zip")
    with zipfile.ZipFile(exported) as zipped:
        csv_text = zipped.read("medical_ratings.csv").decode()
        assert "MRI: axial brain" in csv_text and ",3,MRI,2," in csv_text
        everything = b"".join(zipped.read(name) for name in zipped.namelist())
    assert b"MUSTERMANN" not in everything and b"DEMO00001" not in everything

    # with DICOM: de-identified Secondary Captures, the method recorded
    with zipfile.ZipFile(room.export("ratings_csv", tmp_path / "dicom.zip", dicom=True)) as zipped:
        files = [n for n in zipped.namelist() if n.endswith(".dcm")]
        assert len(files) == 2
        for name in files:
            ds = pydicom.dcmread(io.BytesIO(zipped.read(name)))
            assert ds.PatientIdentityRemoved == "YES" and "MUSTERMANN" not in str(ds.get("PatientName", ""))


def test_an_archive_that_climbs_out_of_its_folder_is_refused_whole(tmp_path):
    from data.ratings import RatingsFileError

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ratings.csv", "image_path,rating,modality,expert_level,prompt\n")
        zipped.writestr("../../escaped.txt", "x")
    room = ControlRoom(workdir=tmp_path / "run", config=CONFIG)
    with pytest.raises(RatingsFileError, match="would unpack outside"):
        room.import_ratings(archive, imported_by="alice")
    assert not (tmp_path / "escaped.txt").exists() and room.counts()["imported_per_modality"] == {}


def test_overlap_sends_that_share_of_groups_to_two_experts_and_agreement_follows(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    with pytest.raises(ValueError, match="between 0 and 1"):
        room.set_overlap(1.5)
    room.set_overlap(0.5)
    groups = [room.generate(PROMPT, seed=s) for s in range(4)]
    assert [room.store.get_group(g.id)["wanted_rankings"] for g in groups] == [1, 2, 1, 2]
    first, second = ([s.id for s in g.survivors] for g in groups[:2])
    a, b, c = second
    room.rank(second_id := groups[1].id, [[a], [b], [c]], expert="ann", level=3, seconds=2.0)
    assert room.next_group("bob").id == groups[0].id
    room.rank(groups[0].id, [first], expert="bob")
    assert room.next_group("bob").id == second_id  # still waiting for its second expert
    room.rank(second_id, [[a], [c], [b]], expert="bob", seconds=4.0)
    # ann a > b > c, bob a > c > b: one of three pairs discordant, tau_b = (2 - 1) / 3
    assert room.agreement() == [{"expert_a": "ann", "expert_b": "bob", "groups": 1, "defined": 1, "tau_b": pytest.approx(1 / 3)}]
    assert [(e["expert"], e["level"], e["rankings"], e["median_seconds"]) for e in room.experts()] == [
        ("ann", 3, 1, 2.0), ("bob", 1, 2, 4.0)]
    assert room.overlap == 0.5
    room.store.close()
    assert ControlRoom(workdir=tmp_path, config=CONFIG).overlap == 0.5  # kept across restarts


def test_history_has_a_row_per_version_with_loss_kl_rating_and_quality(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    group = room.generate(PROMPT, seed=1)
    a, b, c = (s.id for s in group.survivors)
    room.rank(group.id, [[a], [b], [c]], expert="ann", ratings={a: 3, b: 2, c: 1})
    room.apply_update("dpo", who="ann")
    first, second = room.history()
    assert (first["id"], first["loss"], first["rating"]) == ("v0", None, pytest.approx(0.5))  # mean of 3, 2, 1 -> 2 -> 0.5
    assert 0 < first["quality"] <= 1
    assert second["id"] == "v1" and second["loss"] > 0 and second["kl"] > 0 and second["rating"] is None


def test_an_export_reads_the_store_in_a_fixed_number_of_queries(tmp_path):
    """The export reads every ranked group at once (``Store.groups_with_rankings``), not group by group."""
    from PIL import Image
    from sqlalchemy import event

    from data.store import NewCandidate

    room = ControlRoom(workdir=tmp_path, config=CONFIG)

    def ranked_group(k: int) -> None:
        images = []
        for shade in (40 * k, 40 * k + 20):
            buffer = io.BytesIO()
            Image.new("L", (8, 8), shade).save(buffer, format="PNG")
            images.append(NewCandidate(buffer.getvalue(), passed=True))
        g = room.store.add_group(f"CT: group {k}", "v0", [0, 1], {}, images)
        room.rank(g, [[f"{g}-c1"], [f"{g}-c0"]], expert="ann", ratings={f"{g}-c1": 3})

    statements = []
    event.listen(room.store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    def export(kind: str, name: str) -> tuple[Path, int]:
        statements.clear()
        path = room.export(kind, tmp_path / name)
        return path, len(statements)

    ranked_group(0)
    _, one = export("pickapic", "one.parquet")
    for k in (1, 2, 3):
        ranked_group(k)
    path, four = export("pickapic", "four.parquet")
    assert one == four
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert sorted(rows["caption"]) == [f"CT: group {k}" for k in range(4)] and set(rows["label_1"]) == {1.0}
    zipped, queries = export("ratings_csv", "ratings.zip")
    assert queries == four
    with zipfile.ZipFile(zipped) as archive:
        assert archive.read("medical_ratings.csv").decode().count("\n") == 5  # the header and one rating a group


def test_an_update_whose_images_the_selector_refuses_more_than_the_base_is_refused(tmp_path, monkeypatch):
    """The reward-hacking guard: the probe's pass rate is measured on the base model (adapters off) and on
    the trained weights; more than ``max_pass_rate_drop`` fewer passing refuses the update."""
    from dataclasses import replace

    room = ControlRoom(workdir=tmp_path, config=replace(CONFIG, pass_rate_probe=6, max_pass_rate_drop=0.125))
    prompts = [PROMPT, "MRI: axial slice of the brain"]
    for k, prompt in enumerate(prompts):
        group = room.generate(prompt, seed=k)
        room.rank(group.id, [[c.id] for c in group.survivors], expert="ann")
    judge, probes = room.sampler.selector.judge, []

    def spoiled_once_trained(images, prompt=None):  # the trained weights' candidates of the second prompt fail
        verdicts = judge(images, prompt=prompt)
        probes.append((prompt, len(images)))
        if len(probes) > 2 and prompt == prompts[1]:
            verdicts = [replace(v, passed=False, reasons=["spoiled"]) for v in verdicts[:1]] + verdicts[1:]
        return verdicts

    monkeypatch.setattr(room.sampler.selector, "judge", spoiled_once_trained)
    result = room.apply_update("dpo")
    assert probes == [(prompts[0], 3), (prompts[1], 3)] * 2  # six candidates over the update's two prompts
    assert not result.applied and room.policy.version == "v0"
    assert result.message == ("update refused: the selector passes 83% of 6 candidates on fixed seeds where the base "
                              "model passes 100% (more than 12% fewer): the update would spoil the images; v0 stays current")
    assert len(room.store.unused_ranked_groups()) == 2  # the groups wait for the next update

    monkeypatch.setattr(room.sampler.selector, "judge", judge)
    assert room.apply_update("dpo").applied  # unspoiled, the trained weights pass as the base does


def test_an_update_that_makes_the_candidates_of_a_prompt_alike_is_refused_when_the_guard_is_set(tmp_path, monkeypatch):
    """The collapse guard: on the same fixed seeds, the trained weights' candidates of a prompt may not differ
    from one another more than ``max_diversity_drop`` less than the base model's. Unset (the default) the
    figures are reported and nothing is refused."""
    from dataclasses import replace

    import workbench.room

    room = ControlRoom(workdir=tmp_path, config=replace(CONFIG, pass_rate_probe=6, max_diversity_drop=0.2))
    for k, prompt in enumerate([PROMPT, "MRI: axial slice of the brain"]):
        group = room.generate(prompt, seed=k)
        room.rank(group.id, [[c.id] for c in group.survivors], expert="ann")
    real_grey_levels, seen = workbench.room.grey_levels, []

    def alike_once_trained(image):  # the base's 6 probe candidates as drawn; the trained weights' all one image
        seen.append(image)
        return real_grey_levels(image) if len(seen) <= 6 else real_grey_levels(seen[0])

    monkeypatch.setattr(workbench.room, "grey_levels", alike_once_trained)
    result = room.apply_update("dpo")
    assert not result.applied and room.policy.version == "v0"
    assert result.message == ("update refused: the candidates of a prompt on fixed seeds differ 100% less from one another "
                              "than the base model's (more than 20% less): the update would make the images alike (a lower "
                              "learning rate or fewer passes moves them less); v0 stays current")
    assert len(room.store.unused_ranked_groups()) == 2
    assert result.metrics["probe"]["diversity_trained"] == 0.0 < result.metrics["probe"]["diversity_base"]

    room.config.max_diversity_drop = None  # the default: reported only
    result = room.apply_update("dpo")
    probe = result.metrics["probe"]
    assert result.applied and probe["candidates"] == 6 and probe["pass_rate_base"] == 1.0
    assert probe["diversity_trained"] == 0.0 < probe["diversity_base"]
    assert room.version_store.get(result.version.id).metrics["probe"] == probe  # saved with the version
