"""De-identification on the demo set's DICOMs (fake patients) and on pydicom's bundled CT and MR files."""

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from data.deid import BASIC_PROFILE, METHOD, Deidentifier, deidentify, deidentify_file

# Addressed by path, never through get_testdata_file: that tries to download files not bundled.
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DEMO = Path(__file__).parents[1] / "data" / "demo" / "images"

#: Identifying values each file carries, searched for in the bytes of the de-identified file.
IDENTIFYING = {
    TEST_FILES / "CT_small.dcm": [
        "CompressedSamples^CT1", "1CT1", "ABCD1234", "1234ABCD", "JFK IMAGING CENTER", "CT01_OC0",
        "20040119", "19970430", "GEMS_IDEN_01", "CLUNIE1",
    ],
    TEST_FILES / "MR_small.dcm": ["CompressedSamples^MR1", "4MR1", "-0000200", "20040826", "185059", "CLUNIE1"],
}
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def demo_identifying(path: Path) -> list[str]:
    """The demo file's fake patient tags (data.demo_set.fake_patient), its dates and its UIDs."""
    dataset = pydicom.dcmread(path)
    keywords = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
                "AccessionNumber", "StudyDate", "ContentTime")
    return [str(dataset[k].value) for k in keywords] + [dataset[k].value for k in UID_KEYWORDS[:3]]


def written(dataset: Dataset) -> bytes:
    """The dataset as a DICOM file's bytes, less its pixel data (whose bytes may hold any string by chance)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue().replace(dataset.PixelData, b"")


@pytest.mark.parametrize("path", [DEMO / "0001.dcm", DEMO / "0003.dcm", *IDENTIFYING])
def test_no_identifying_value_is_left_in_the_file(path):
    original = pydicom.dcmread(path)
    identifying = (IDENTIFYING.get(path) or demo_identifying(path)) + [original[k].value for k in UID_KEYWORDS if k in original] + [original.file_meta.MediaStorageSOPInstanceUID]
    assert all(value.encode() in written(original) for value in identifying)  # the search would find them
    raw = written(deidentify(original, Deidentifier("test secret")))
    assert [value for value in identifying if value.encode() in raw] == []


@pytest.mark.parametrize("path", [DEMO / "0001.dcm", *IDENTIFYING])
def test_every_listed_attribute_gets_its_action(path):
    original = pydicom.dcmread(path)
    clean = deidentify(original, Deidentifier("test secret"))
    checked = 0
    for keyword, (_, action) in BASIC_PROFILE.items():
        if keyword not in original or keyword == "PatientID":  # PatientID holds the pseudonym, empty here
            continue
        checked += 1
        if action == "X":
            assert keyword not in clean, keyword
        elif action == "Z":
            assert clean[keyword].is_empty, keyword
        elif action == "U" and original[keyword].VR == "UI":
            assert clean[keyword].value != original[keyword].value, keyword
    assert checked >= 10 and clean.PatientID == ""


def test_private_tags_curves_and_overlays_are_gone_and_the_pixels_are_kept():
    original = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    original.add_new(0x60000010, "US", 128)  # an overlay plane: Overlay Rows and Overlay Comments
    original.add_new(0x60004000, "LT", "reviewed by DR NO")
    original.ReferencedImageSequence = [Dataset()]
    original.ReferencedImageSequence[0].add_new(0x00091001, "LO", "private inside a sequence")
    assert any(element.tag.is_private for element in original.iterall())
    clean = deidentify(original, Deidentifier())
    assert not any(element.tag.is_private for element in clean.iterall())
    assert not any(element.tag.group & 0xFF00 in (0x5000, 0x6000) for element in clean.iterall())
    assert clean.PixelData == original.PixelData
    assert np.array_equal(clean.pixel_array, original.pixel_array)


def test_the_method_is_recorded_and_burned_in_annotation_left_as_it_was():
    original = pydicom.dcmread(DEMO / "0001.dcm")
    clean = deidentify(original, Deidentifier())
    assert clean.PatientIdentityRemoved == "YES" and clean.DeidentificationMethod == METHOD
    code = clean.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "113100", "DCM", "Basic Application Confidentiality Profile")
    assert clean.BurnedInAnnotation == original.BurnedInAnnotation == "NO"
    assert "BurnedInAnnotation" not in deidentify(pydicom.dcmread(TEST_FILES / "CT_small.dcm"), Deidentifier())


def test_uids_stay_consistent_across_the_files_of_one_study():
    first = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    second = copy.deepcopy(first)  # the next slice: same study, series and frame of reference
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID + ".2"
    second.ReferencedImageSequence = [Dataset()]
    second.ReferencedImageSequence[0].ReferencedSOPClassUID = first.SOPClassUID
    second.ReferencedImageSequence[0].ReferencedSOPInstanceUID = first.SOPInstanceUID
    session = Deidentifier("test secret")
    a, b = deidentify(first, session), deidentify(second, session)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert a[keyword].value == b[keyword].value != first[keyword].value
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID  # the reference still holds
    assert b.ReferencedImageSequence[0].ReferencedSOPClassUID == first.SOPClassUID  # class UIDs are kept
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert deidentify(first, Deidentifier("test secret")).StudyInstanceUID == a.StudyInstanceUID  # same secret
    assert deidentify(first, Deidentifier()).StudyInstanceUID != a.StudyInstanceUID  # another session
    assert pydicom.uid.UID(a.StudyInstanceUID).is_valid


def test_the_input_is_not_modified_and_a_pseudonym_is_kept():
    original = pydicom.dcmread(DEMO / "0001.dcm")
    before = copy.deepcopy(original)
    clean = deidentify(original, Deidentifier(), patient_id="STUDY-007")
    assert original == before and original.file_meta == before.file_meta
    assert clean.PatientID == "STUDY-007" and clean.PatientName == ""
    with pytest.raises(ValueError, match="pseudonym"):
        deidentify(original, Deidentifier(), patient_id=str(original.PatientID))


def test_deidentify_file_writes_a_readable_file(tmp_path):
    destination = deidentify_file(DEMO / "0001.dcm", tmp_path / "out" / "clean.dcm", Deidentifier())
    clean = pydicom.dcmread(destination)
    assert clean.PatientName == "" and clean.PatientIdentityRemoved == "YES"
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert np.array_equal(clean.pixel_array, pydicom.dcmread(DEMO / "0001.dcm").pixel_array)


def test_the_profile_table_names_real_attributes_and_allowed_actions():
    for keyword, (profile, applied) in BASIC_PROFILE.items():
        assert tag_for_keyword(keyword) is not None, keyword
        assert applied in profile.replace("*", "").split("/"), keyword
    with pytest.raises(ValueError, match="empty"):
        Deidentifier("")
