"""The shipped demo ratings set: big enough, every row valid, DICOM with fake patient tags, the rating rule."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from data.demo_set import expert_rating, true_quality
from data.modalities import MODALITIES
from data.ratings import read_ratings

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def test_demo_csv_loads_whole_with_four_modalities_and_three_levels():
    ratings = read_ratings(DEMO / "medical_ratings.csv")
    assert ratings.errors == [] and len(ratings.rows) >= 200
    assert set(ratings.rows["modality"]) == set(MODALITIES)
    assert set(ratings.rows["expert_level"]) == {1, 2, 3}
    assert set(ratings.rows["rating"]) == {1.0, 2.0, 3.0}
    suffixes = {Path(p).suffix for p in ratings.rows["image_path"]}
    assert suffixes == {".png", ".dcm"}
    assert ratings.rows["image_path"].duplicated().any()  # some images carry a second expert's rating


def test_demo_dicom_files_carry_fake_patient_tags_for_deidentification():
    dataset = pydicom.dcmread(DEMO / "images" / "0001.dcm")
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert str(dataset.PatientName) and dataset.PatientID == "DEMO00001" and len(dataset.PatientBirthDate) == 8
    assert dataset.InstitutionName == "Demo General Hospital"


def test_rating_rule_maps_quality_to_one_two_three_and_senior_experts_are_steadier():
    rng = np.random.default_rng(0)
    assert true_quality("none", 0.7) == 1.0 and true_quality("blank", 0.1) == 0.0
    assert true_quality("noise", 0.25) == pytest.approx(0.75)
    level3 = [expert_rating(0.5, 3, rng) for _ in range(2000)]
    level1 = [expert_rating(0.5, 1, rng) for _ in range(2000)]
    assert set(level3) | set(level1) <= {1, 2, 3}
    assert np.mean(np.array(level3) == 2) > np.mean(np.array(level1) == 2) + 0.2  # q = 0.5 is a 2
