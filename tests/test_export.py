"""Exports of a hand-worked group: 4 candidates, tiers [[c2], [c0, c3], [c1]], ranked by two experts.

Pairs in generation order (a generated before b), with a's label:
(c0, c1) 1, (c0, c2) 0, (c0, c3) 0.5 (tie), (c1, c2) 0, (c1, c3) 0, (c2, c3) 1:
5 decided pairs and 1 tie per ranking, so 12 Pick-a-Pic rows, 10 TRL rows and 2 group rows.
"""

import io
import zipfile
from datetime import datetime, timezone

import datasets
import numpy as np
import pydicom
import pytest
from PIL import Image

from data.export import (
    CandidateRecord, RankedGroupRecord, RankingRecord, RatingRecord, export, pseudonym,
)
from data.images import write_png
from data.ratings import read_ratings

SECRET = "installation secret"
TIERS = [["c2"], ["c0", "c3"], ["c1"]]
WHEN = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def png(level: int) -> bytes:
    """A small gray PNG whose every pixel is ``level``: each candidate's image is told apart by it."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), level).save(buffer, "PNG")
    return buffer.getvalue()


LEVELS = {"c0": 10, "c1": 60, "c2": 120, "c3": 200}


def group(**changes) -> RankedGroupRecord:
    fields = dict(
        group_id="g1",
        prompt="CT: axial slice with a bright lesion",
        candidates=[CandidateRecord(c, png(LEVELS[c]), f"v{i % 2}") for i, c in enumerate(LEVELS)],
        rankings=[
            RankingRecord("r1", "Dr Alice Smith", 3, TIERS, WHEN),
            RankingRecord("r2", "Dr Bob Jones", 1, TIERS, WHEN),
        ],
        modality="CT",
        ratings=(RatingRecord("c2", "Dr Alice Smith", 3, 3), RatingRecord("c1", "Dr Alice Smith", 3, 1),
                 RatingRecord("c2", "Dr Bob Jones", 1, 2)),
    )
    return RankedGroupRecord(**(fields | changes))


def load(path, tmp_path, monkeypatch) -> datasets.Dataset:
    """The file through ``datasets.load_dataset``, offline, with its cache under tmp_path."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets.load_dataset("parquet", data_files=str(path), cache_dir=str(tmp_path / "cache"), split="train")


def level_of(image: Image.Image) -> int:
    return int(np.asarray(image)[0, 0])


def candidate_of(image: Image.Image) -> str:
    return {level: c for c, level in LEVELS.items()}[level_of(image)]


def test_pickapic_rows_labels_and_pseudonyms(tmp_path, monkeypatch):
    rows = load(export("pickapic", [group()], tmp_path / "p.parquet", secret=SECRET), tmp_path, monkeypatch)
    assert len(rows) == 12
    assert isinstance(rows.features["jpg_0"], datasets.Image) and isinstance(rows.features["jpg_1"], datasets.Image)
    first = rows.select(range(6))
    pairs = [(candidate_of(r["jpg_0"]), candidate_of(r["jpg_1"]), r["label_0"], r["label_1"]) for r in first]
    assert pairs == [("c0", "c1", 1, 0), ("c0", "c2", 0, 1), ("c0", "c3", 0.5, 0.5),
                     ("c1", "c2", 0, 1), ("c1", "c3", 0, 1), ("c2", "c3", 1, 0)]
    assert rows["ranking_id"] == ["r1"] * 6 + ["r2"] * 6 and rows["expert_level"] == [3] * 6 + [1] * 6
    assert set(rows["caption"]) == {"CT: axial slice with a bright lesion"}
    assert (rows[0]["model_0"], rows[0]["model_1"]) == ("v0", "v1") and rows[0]["created_at"] == WHEN
    alice, bob = pseudonym("Dr Alice Smith", SECRET), pseudonym("Dr Bob Jones", SECRET)
    assert rows["user_id"] == [alice] * 6 + [bob] * 6 and alice != bob
    assert pseudonym("Dr Alice Smith", SECRET) == alice != pseudonym("Dr Alice Smith", "another secret")
    raw = (tmp_path / "p.parquet").read_bytes()
    assert b"Alice" not in raw and b"Bob" not in raw and "Alice" not in str(alice)


def test_trl_rows_skip_ties(tmp_path, monkeypatch):
    rows = load(export("trl", [group()], tmp_path / "t.parquet", secret=SECRET), tmp_path, monkeypatch)
    assert list(rows.features) == ["prompt", "chosen", "rejected", "source"] and len(rows) == 10
    assert set(rows["source"]) == {"human"}
    assert isinstance(rows.features["chosen"], datasets.Image)
    pairs = [(candidate_of(r["chosen"]), candidate_of(r["rejected"])) for r in rows.select(range(5))]
    assert pairs == [("c0", "c1"), ("c2", "c0"), ("c2", "c1"), ("c3", "c1"), ("c2", "c3")]


def test_groups_rows_rank_by_tier(tmp_path, monkeypatch):
    partial = RankingRecord("r3", "Dr Carol", 2, [["c3"], ["c1"]], WHEN)  # ranks two candidates only
    records = [group(rankings=group().rankings + [partial])]
    rows = load(export("groups", records, tmp_path / "g.parquet", secret=SECRET), tmp_path, monkeypatch)
    assert len(rows) == 3 and isinstance(rows.features["generations"].feature, datasets.Image)
    assert rows["ranking"] == [[2, 3, 1, 2], [2, 3, 1, 2], [2, 1]]
    assert [[candidate_of(image) for image in row] for row in rows["generations"]] == [list(LEVELS)] * 2 + [["c1", "c3"]]
    assert rows["expert_level"] == [3, 1, 2] and rows["user_id"][2] == pseudonym("Dr Carol", SECRET)


def test_ratings_zip_lists_its_files_and_reads_back(tmp_path):
    unrated = group(group_id="g2", ratings=())
    path = export("ratings_csv", [group(), unrated], tmp_path / "r.zip", secret=SECRET, dicom=True)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == [
            "images/g1_c1.dcm", "images/g1_c1.png", "images/g1_c2.dcm", "images/g1_c2.png", "medical_ratings.csv"]
        archive.extractall(tmp_path / "out")
    ratings = read_ratings(tmp_path / "out" / "medical_ratings.csv")
    assert ratings.errors == []
    assert ratings.rows[["image_path", "rating", "modality", "expert_level"]].values.tolist() == [
        ["images/g1_c2.png", 3.0, "CT", 3], ["images/g1_c1.png", 1.0, "CT", 3], ["images/g1_c2.png", 2.0, "CT", 1]]
    assert level_of(Image.open(tmp_path / "out" / "images" / "g1_c1.png")) == LEVELS["c1"]
    scan = pydicom.dcmread(tmp_path / "out" / "images" / "g1_c2.dcm")
    assert scan.PatientIdentityRemoved == "YES" and scan.Modality == "CT"
    assert all(scan.get(k, "") == "" for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"))
    assert abs(int(scan.pixel_array[0, 0]) / 4095 - LEVELS["c2"] / 255) < 1 / 4095


def test_a_prefix_that_is_no_modality_name_exports_as_unknown_and_imports_again(tmp_path):
    odd = {"g1": "axial slice, soft-tissue window", "g2": "m" * 41, "g3": None, "g4": "PET/CT"}
    records = [group(group_id=g, modality=m, prompt=f"{m}: liver") for g, m in odd.items()]
    with zipfile.ZipFile(export("ratings_csv", records, tmp_path / "r.zip", secret=SECRET)) as archive:
        archive.extractall(tmp_path / "out")
    ratings = read_ratings(tmp_path / "out" / "medical_ratings.csv")
    assert ratings.errors == []  # the reader's rule is the export's: no row refused
    assert ratings.rows.groupby("image_path")["modality"].first().to_dict() == {
        "images/g1_c1.png": "unknown", "images/g1_c2.png": "unknown", "images/g2_c1.png": "unknown",
        "images/g2_c2.png": "unknown", "images/g3_c1.png": "unknown", "images/g3_c2.png": "unknown",
        "images/g4_c1.png": "pet/ct", "images/g4_c2.png": "pet/ct"}


def test_a_16_bit_png_keeps_its_depth_in_the_dicom(tmp_path):
    write_png(tmp_path / "deep.png", np.full((4, 4), 0.3), bits=16)
    deep = CandidateRecord("c0", (tmp_path / "deep.png").read_bytes(), "v0")
    record = group(candidates=[deep], rankings=[], ratings=(RatingRecord("c0", "Dr Alice Smith", 3, 2),))
    with zipfile.ZipFile(export("ratings_csv", [record], tmp_path / "r.zip", secret=SECRET, dicom=True)) as archive:
        scan = pydicom.dcmread(io.BytesIO(archive.read("images/g1_c0.dcm")))
    assert int(scan.pixel_array[0, 0]) == round(0.3 * 4095)


def test_writes_are_atomic_and_replace_the_old_file(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"old")
    export("pickapic", [group()], tmp_path / "p.parquet", secret=SECRET)
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"] and (tmp_path / "p.parquet").read_bytes()[:4] == b"PAR1"
    broken = group(candidates=[CandidateRecord(c, b"JPEG", "v0") for c in LEVELS])
    with pytest.raises(ValueError, match="not a PNG"):
        export("ratings_csv", [broken], tmp_path / "r.zip", secret=SECRET)
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]  # the failed export left no temporary file


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown export kind 'csv'; expected one of pickapic, trl, groups, ratings_csv"):
        export("csv", [group()], tmp_path / "x", secret=SECRET)
    with pytest.raises(ValueError, match="secret is empty"):
        export("trl", [group()], tmp_path / "x", secret="")
    with pytest.raises(ValueError, match="dicom=True applies to ratings_csv only"):
        export("trl", [group()], tmp_path / "x", secret=SECRET, dicom=True)
    stray = group(rankings=[RankingRecord("r9", "Dr Alice Smith", 3, [["c0"], ["c9"]], WHEN)])
    with pytest.raises(ValueError, match="ranking r9 of group g1 names unknown candidates: c9"):
        export("trl", [stray], tmp_path / "x", secret=SECRET)
    with pytest.raises(ValueError, match="cannot be a file name"):
        export("ratings_csv", [group(group_id="../up")], tmp_path / "x", secret=SECRET)
    assert list(tmp_path.iterdir()) == []
