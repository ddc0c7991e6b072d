"""A host's own domain: modalities come from the ratings CSV a selector is trained on, and the rule
gates alone (``--selector gates``) serve a domain with no ratings yet."""

import csv
import json
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open

from data.images import write_png
from data.modalities import MODALITIES, modality_name, modality_name_problem, modality_of_prompt
from data.phantoms import make_phantom
from data.ratings import RatingsConfig, read_ratings, write_ratings
from optim.selector.model import GATES, Selector, SelectorLoadError
from optim.selector.training import TrainingConfig, train_selector
from tests.conftest import FAST
from workbench.room import ControlRoom, RoomConfig

NAME_RULE = "(at most 4 words and 40 characters: letters, digits, spaces and - / + . ( ) ' &)"


@pytest.fixture(scope="module")
def derm_csv(tmp_path_factory):
    """A host's ratings: 6 'dermoscopy' and 6 'Fundus' images (phantoms standing in), and one row
    whose modality is a misspelling on a single image."""
    root = tmp_path_factory.mktemp("derm")
    rows = []
    for k in range(6):
        for kind, phantom, prompt in (("dermoscopy", "CT", "Dermoscopy: pigmented lesion"),
                                      ("Fundus", "OCT", "fundus: optic disc")):
            path = write_png(root / f"{kind}_{k}.png", make_phantom(phantom, k).image)
            rows.append({"image_path": path.name, "rating": 1 + k % 3, "modality": kind, "expert_level": 2, "prompt": prompt})
    typo = write_png(root / "typo.png", make_phantom("CT", 9).image)
    rows.append({"image_path": typo.name, "rating": 3, "modality": "dermoscpy", "expert_level": 1,
                 "prompt": "Dermoscopy: nevus"})
    return write_ratings(rows, root / "ratings.csv")


@pytest.fixture(scope="module")
def derm_selector(derm_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("selector")
    report = train_selector(derm_csv, out, TrainingConfig(epochs=2, val_fraction=0.25))
    return out, report


def test_a_hosts_modalities_load_from_its_ratings_csv_and_a_fixed_list_names_the_row_and_field(tmp_path):
    for k, name in enumerate(("a", "b")):
        write_png(tmp_path / f"{name}.png", make_phantom("CT", k).image)
    (tmp_path / "ratings.csv").write_text(
        "image_path,rating,modality,expert_level,prompt\n"
        "a.png,2, Dermoscopy ,1,Dermoscopy: lesion\n"
        "b.png,3,mr,2,MRI: brain\n"
        "a.png,2,fundus: photo,1,x\n"
        f"b.png,2,{'m' * 41},1,x\n"
        "a.png,2,,1,x\n", encoding="utf-8")
    ratings = read_ratings(tmp_path / "ratings.csv")
    assert ratings.rows["modality"].tolist() == ["dermoscopy", "MRI"]  # other names in lower case, known ones canonical
    assert [str(e) for e in ratings.errors] == [
        f"row 4: modality: 'fundus: photo' is not a modality name {NAME_RULE}",
        f"row 5: modality: '{'m' * 41}' is not a modality name {NAME_RULE}",
        "row 6: modality: empty",
    ]
    fixed = read_ratings(tmp_path / "ratings.csv", config=RatingsConfig(modalities=MODALITIES))
    assert [str(e) for e in fixed.errors][0] == (
        "row 2: modality: 'Dermoscopy' is not a modality the selector knows; use one of CT, MRI, XRAY, OCT")
    assert fixed.rows["modality"].tolist() == ["MRI"]


def test_prompts_name_a_modality_the_selector_knows():
    assert modality_name("  Fundus   Photo ") == "fundus photo" and modality_name("DX") == "XRAY"
    assert modality_of_prompt("Fundus photo: optic disc", ("fundus photo",)) == "fundus photo"
    assert modality_of_prompt("Fundus: optic disc") is None  # not one of the built-in four
    assert modality_of_prompt("CT: liver", ("dermoscopy",)) is None
    assert modality_of_prompt("Dermoscopy: lesion", known=None) == "dermoscopy"  # any prefix that is a modality name
    assert modality_of_prompt("PET/CT: staging", known=None) == "pet/ct"
    for prompt in ("Axial slice, soft-tissue window: liver", f"{'m' * 41}: x", "a b c d e: x", "\x00ct: x"):
        assert modality_of_prompt(prompt, known=None) is None, prompt
    assert modality_name_problem("Fundus  photo") is None and modality_name_problem(" ") == "empty"


def test_a_new_selector_learns_the_csvs_modalities_and_keeps_them_with_its_weights(derm_selector):
    out, report = derm_selector
    assert report["modalities"] == ["dermoscopy", "fundus"]
    assert report["rejected_csv_rows"] == [
        "row 14: modality: 'dermoscpy' is shown by only 1 image(s); a modality needs at least 3 to be learned (a misspelling?)"]
    assert json.loads((out / "selector.json").read_text())["modalities"] == ["dermoscopy", "fundus"]
    with safe_open(out / "selector.safetensors", "pt") as weights:
        assert json.loads(weights.metadata()["modalities"]) == ["dermoscopy", "fundus"]
        assert weights.get_tensor("modality.weight").shape[0] == 2  # the head sized from the CSV

    selector = Selector.load(out)
    assert selector.modalities == ("dermoscopy", "fundus")
    image = make_phantom("OCT", 20).image
    verdict = selector.judge([image], prompt="Fundus: optic disc")[0]
    assert verdict.asked_modality == "fundus" and set(verdict.modality_probabilities) == {"dermoscopy", "fundus"}
    assert selector.judge([image], prompt="CT: liver")[0].asked_modality is None  # a modality it does not know
    with pytest.raises(ValueError, match="unknown modality 'CT'; this selector knows dermoscopy, fundus"):
        selector.judge([image], modality="CT")
    assert "prompts starting with dermoscopy:, fundus:" in selector.describe()


def test_a_selector_whose_names_do_not_fit_its_head_is_refused_naming_the_files(derm_selector, tmp_path):
    out, _ = derm_selector
    for name in ("selector.safetensors", "selector.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    meta = json.loads((tmp_path / "selector.json").read_text())
    meta["modalities"] = ["dermoscopy", "fundus", "ultrasound"]
    (tmp_path / "selector.json").write_text(json.dumps(meta))
    with pytest.raises(SelectorLoadError, match="selector.json names the modalities .* but .*selector.safetensors was saved with"):
        Selector.load(tmp_path)
    meta["modalities"] = []
    (tmp_path / "selector.json").write_text(json.dumps(meta))
    with pytest.raises(SelectorLoadError, match="'modalities' must list the modality head's names"):
        Selector.load(tmp_path)
    meta["modalities"] = ["dermoscopy", "fundus"]
    (tmp_path / "selector.json").write_text(json.dumps(dict(meta, channels=16)))
    with pytest.raises(SelectorLoadError, match="selector.safetensors does not fit a selector of 16 channels"):
        Selector.load(tmp_path)
    (tmp_path / "selector.json").write_text(json.dumps(dict(meta, config={"threshold": 1})))
    with pytest.raises(SelectorLoadError, match="'config' holds a setting the selector does not have"):
        Selector.load(tmp_path)
    (tmp_path / "selector.json").write_text(json.dumps(meta))
    (tmp_path / "selector.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SelectorLoadError, match="selector.safetensors is not a safetensors file"):
        Selector.load(tmp_path)


def test_a_selector_of_one_modality_says_it_checks_no_modality():
    from optim.selector.model import SelectorNet

    torch.manual_seed(0)
    selector = Selector(SelectorNet(8, modalities=1), modalities=("dermoscopy",), name="derm")
    verdict = selector.judge([make_phantom("OCT", 0).image], prompt="Dermoscopy: lesion")[0]
    assert verdict.modality_probabilities == {"dermoscopy": 1.0}  # whatever the image shows: nothing to tell apart
    assert selector.describe().endswith("no modality check (trained on dermoscopy images alone, it has no other "
                                        "modality to tell them from)")
    assert "prompts starting with" not in selector.describe()


def test_the_shipped_selector_keeps_its_four_modalities():
    selector = Selector.load()
    assert selector.modalities == MODALITIES and selector.name == "the embedded selector"
    assert "prompts starting with CT:, MRI:, chest X-ray:, OCT:" in selector.describe()


def test_the_rule_gates_alone_pass_clean_images_and_name_faults():
    gates = Selector.load(GATES)
    clean, blank = make_phantom("CT", 1).image, np.full((64, 64), 0.4, np.float32)
    passed, rejected = gates.judge([clean, blank], prompt="Dermoscopy: lesion")
    assert passed.passed and passed.quality is None and passed.modality_probabilities == {} and passed.asked_modality is None
    assert passed.summary() == "passed the rule gates"
    assert not rejected.passed and rejected.reasons == ["blank image"]
    assert gates.judge([clean], modality="fundus")[0].passed  # no modality to check against
    assert gates.describe().startswith("gates: the rule gates") and "no quality score and no modality check" in gates.describe()
    with pytest.raises(ValueError, match="no weights to save"):
        gates.save("/nowhere", 32)


def test_a_room_on_the_gates_alone_serves_a_new_domain_and_exports_its_modality(tmp_path):
    from workbench.api import RoomAPI
    from workbench.ui import build_page

    room = ControlRoom(workdir=tmp_path / "run", selector=GATES,
                       config=RoomConfig(survivors=2, batch_size=2, max_draws=2, steps=FAST["steps"], pass_rate_probe=0))
    group = room.generate("Dermoscopy: pigmented lesion", n=2, seed=0)
    assert len(group.survivors) == 2 and group.survivors[0].scores["quality"] is None
    room.rank(group.id, [[group.survivors[1].id], [group.survivors[0].id]], expert="alice",
              ratings={group.survivors[1].id: 3})
    with zipfile.ZipFile(room.export("ratings_csv", tmp_path / "out.zip")) as zipped:
        rows = list(csv.DictReader(zipped.read("medical_ratings.csv").decode().splitlines()))
    assert [r["modality"] for r in rows] == ["dermoscopy"]

    page = build_page(RoomAPI(room, None))
    shown = [block.value for block in page.blocks.values() if getattr(block, "elem_id", None) == "selector-info"]
    assert shown == [f"**Selector:** {room.sampler.selector.describe()}"] and "gates: the rule gates" in shown[0]


def test_a_room_exports_prompts_whose_prefix_is_no_modality_name_so_that_they_import_again(tmp_path):
    room = ControlRoom(workdir=tmp_path / "run", selector=GATES,
                       config=RoomConfig(survivors=1, batch_size=1, max_draws=1, steps=FAST["steps"], pass_rate_probe=0))
    prompts = ["Axial slice, soft-tissue window: liver", f"{'Very long description of the scan ' * 2}: liver",
               "Dermoscopy: pigmented lesion"]
    for prompt in prompts:
        group = room.generate(prompt, n=1, seed=0)
        room.rank(group.id, [[group.survivors[0].id]], expert="alice", ratings={group.survivors[0].id: 2})
    exported = room.export("ratings_csv", tmp_path / "out.zip")
    with zipfile.ZipFile(exported) as zipped:
        rows = list(csv.DictReader(zipped.read("medical_ratings.csv").decode().splitlines()))
    assert sorted((r["prompt"], r["modality"]) for r in rows) == sorted(zip(prompts, ["unknown", "unknown", "dermoscopy"]))
    report = room.import_ratings(exported, imported_by="alice")
    assert (report["imported"], report["rejected_rows"], report["errors"]) == (3, 0, [])


def test_app_passes_selector_gates_steps_and_the_collapse_guard_to_the_room_and_refuses_bad_ones_in_one_line(monkeypatch, capsys, tmp_path):
    import app

    monkeypatch.setattr(app, "port_problem", lambda host, port: None)  # another test's page may hold the port
    assert app.main(["--workdir", str(tmp_path), "--selector", str(tmp_path / "nope")]) == 2  # before any model loads
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'nope'} is not a selector folder: "
                                               "expected selector.safetensors and selector.json")
    assert app.main(["--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be between 1 and 1000, got 0"
    rooms = []
    monkeypatch.setattr("workbench.room.ControlRoom", lambda *args, **kwargs: rooms.append(kwargs))
    monkeypatch.setattr("workbench.api.RoomAPI", lambda room, users: users)
    monkeypatch.setattr("workbench.ui.serve", lambda api, host, port: None)
    assert app.main(["--selector", "gates", "--steps", "10", "--collapse-guard", "0.3"]) == 0
    assert rooms[0]["selector"] == "gates" and rooms[0]["config"].steps == 10
    assert rooms[0]["config"].max_diversity_drop == 0.3
    assert app.main([]) == 0 and rooms[1]["selector"] is None and rooms[1]["config"].steps == RoomConfig().steps
    assert rooms[1]["config"].max_diversity_drop is None  # off unless asked for
    assert app.main(["--collapse-guard", "20"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --collapse-guard is the share of variety an update may lose, "
                                               "between 0 and 1 (e.g. 0.3), got 20.0")


def test_app_answers_load_errors_in_one_line_and_lets_a_bug_raise(monkeypatch, capsys, tmp_path, derm_selector):
    import app

    monkeypatch.setattr(app, "port_problem", lambda host, port: None)  # another test's page may hold the port
    workdir = ["--workdir", str(tmp_path / "run")]
    assert app.main(workdir + ["--noise-level", "1.5"]) == 2  # before anything loads
    assert capsys.readouterr().err.strip().startswith("error: --noise-level: noise_level must be in (0, 1], got 1.5")
    broken = tmp_path / "broken-selector"
    broken.mkdir()
    for name in ("selector.safetensors", "selector.json"):
        (broken / name).write_bytes((derm_selector[0] / name).read_bytes())
    (broken / "selector.json").write_text("{not json")
    assert app.main(workdir + ["--selector", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken / 'selector.json'} is not a selector's settings (JSON)")
    assert app.main(workdir + ["--selector", "gates", "--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: model folder not found: {tmp_path / 'nope'}"

    def a_bug(*args, **kwargs):
        raise ValueError("a bug inside the room")

    monkeypatch.setattr("workbench.room.ControlRoom", a_bug)
    with pytest.raises(ValueError, match="a bug inside the room"):  # a traceback, not a one-line "error:"
        app.main(workdir)


def test_offline_grpo_refuses_the_gates_alone():
    from optim.train import TrainConfig

    with pytest.raises(ValueError, match="GRPO's reward is the selector's quality score"):
        TrainConfig(algorithm="grpo", prompts="p.txt", selector=GATES).check()


def test_the_reward_models_selector_features_refuse_the_gates_alone():
    from optim.preference.reward_model import featurizer

    with pytest.raises(ValueError, match="the 'selector' features need a selector network"):
        featurizer("selector", selector=Selector.load(GATES))([make_phantom("CT", 0).image])


def test_app_refuses_a_bad_workdir_store_url_or_port_in_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path):
    import socket

    import app

    monkeypatch.setattr("optim.policy.Policy.load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    port_problem = app.port_problem
    monkeypatch.setattr(app, "port_problem", lambda host, port: None)  # another test's page may hold the port
    a_file = tmp_path / "workdir.txt"
    a_file.write_text("not a folder")
    assert app.main(["--workdir", str(a_file)]) == 2
    assert capsys.readouterr().err.strip() == f"error: the work directory {a_file} is a file, not a folder"
    assert app.main(["--workdir", str(tmp_path / "run"), "--store-url", "notaurl"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: the store URL 'notaurl' is not an SQLAlchemy URL")
    assert app.main(["--workdir", str(tmp_path / "run"), "--store-url", "postgresql//bob:s3cret@box/db"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: the store URL 'postgresql//bob:***@box/db' is not")
    assert app.main(["--workdir", str(tmp_path / "run"), "--store-url", "sqlite:////nonexistent/folder/x.db"]) == 2
    assert capsys.readouterr().err.strip() == ("error: cannot open the store at sqlite:////nonexistent/folder/x.db: "
                                               "unable to open database file")
    monkeypatch.setattr(app, "port_problem", port_problem)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert app.main(["--port", str(port)]) == 2
        assert capsys.readouterr().err.strip() == (f"error: --host 127.0.0.1 --port {port}: cannot listen there "
                                                   "(Address already in use): another server may hold it; pass another --port")
    assert app.main(["--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: --host 127.0.0.1 --port 70000: a port is a number from 1 to 65535"
