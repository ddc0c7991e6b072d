"""DICOM de-identification: the Basic Application Level Confidentiality Profile of PS3.15 Annex E.

Imported DICOM files may carry patient names, IDs, dates and the places and people involved;
nothing of that may leave the workbench in an export. ``deidentify`` applies the profile's actions
to a copy of a dataset, at every level of nesting:

- X: remove the attribute.
- Z: keep it, empty (the attributes an IOD requires to be present, Type 2, such as PatientName).
- D: replace the value by a dummy of the same VR (``_DUMMY``).
- U: replace each UID by a new one. The new UID is a keyed hash (HMAC-SHA256) of the old one under
  the ``Deidentifier``'s secret, so the files of one study keep one new StudyInstanceUID, and a
  reference inside a sequence still points at the new SOPInstanceUID of the file it names. No
  table from old to new UID is kept anywhere: whoever lacks the secret cannot link them back.

``BASIC_PROFILE`` lists the attributes handled: those of Table E.1-1 that commonly appear in
images (patient, study, equipment, people, dates, UIDs), each with the profile's action and the
one applied here. Where the profile offers a choice (X/Z, Z/D, X/Z/D ...) the table applies X when
the attribute is optional (Type 3) in the common image IODs and Z when they require it present;
the sequences marked X/Z/U* are kept and their UIDs replaced. Besides the table: every private
attribute goes, curves (groups 50xx) go, and overlay planes (groups 60xx) go whole, since Overlay
Data, which the profile removes, is Type 1 in its module. The file meta information is rebuilt
(transfer syntax, SOP class, the new SOP instance UID), dropping the source's AE title.

The result records what was done: PatientIdentityRemoved (0012,0062) YES, DeidentificationMethod
(0012,0063), and DeidentificationMethodCodeSequence (0012,0064) with DCM 113100. PatientID stays
empty unless the caller gives a pseudonym. Header cleaning does not touch the pixels: text burned
into the image (BurnedInAnnotation YES, or an old file without the attribute) survives, so
BurnedInAnnotation is left as the file had it, for whoever decides whether the pixels may go out.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
from pathlib import Path

import pydicom
from pydicom.dataelem import empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import tag_for_keyword
from pydicom.uid import generate_uid

#: Keyword -> (action in PS3.15 Table E.1-1, action applied here); see the module's docstring.
BASIC_PROFILE: dict[str, tuple[str, str]] = {
    # Patient: identity, demographics and history.
    "PatientName": ("Z", "Z"),
    "PatientID": ("Z", "Z"),
    "IssuerOfPatientID": ("X", "X"),
    "PatientBirthDate": ("Z", "Z"),
    "PatientBirthTime": ("X", "X"),
    "PatientSex": ("Z", "Z"),
    "OtherPatientIDs": ("X", "X"),
    "OtherPatientIDsSequence": ("X", "X"),
    "OtherPatientNames": ("X", "X"),
    "PatientBirthName": ("X", "X"),
    "PatientMotherBirthName": ("X", "X"),
    "PatientAge": ("X", "X"),
    "PatientSize": ("X", "X"),
    "PatientWeight": ("X", "X"),
    "PatientAddress": ("X", "X"),
    "PatientTelephoneNumbers": ("X", "X"),
    "MedicalRecordLocator": ("X", "X"),
    "MilitaryRank": ("X", "X"),
    "BranchOfService": ("X", "X"),
    "CountryOfResidence": ("X", "X"),
    "RegionOfResidence": ("X", "X"),
    "EthnicGroup": ("X", "X"),
    "Occupation": ("X", "X"),
    "PatientReligiousPreference": ("X", "X"),
    "MedicalAlerts": ("X", "X"),
    "Allergies": ("X", "X"),
    "AdditionalPatientHistory": ("X", "X"),
    "PatientComments": ("X", "X"),
    "LastMenstrualDate": ("X", "X"),
    "AdmissionID": ("X", "X"),
    "AdmittingDiagnosesDescription": ("X", "X"),
    "ReferencedPatientSequence": ("X", "X"),
    # Study, request and procedure.
    "AccessionNumber": ("Z", "Z"),
    "StudyID": ("Z", "Z"),
    "StudyDescription": ("X", "X"),
    "SeriesDescription": ("X", "X"),
    "ProtocolName": ("X/D", "X"),
    "RequestAttributesSequence": ("X", "X"),
    "RequestedProcedureDescription": ("X/Z", "X"),
    "RequestedProcedureID": ("X", "X"),
    "PerformedProcedureStepID": ("X", "X"),
    "PerformedProcedureStepDescription": ("X", "X"),
    "PerformedProcedureStepStartDate": ("X", "X"),
    "PerformedProcedureStepStartTime": ("X", "X"),
    "ReferencedStudySequence": ("X/Z", "X"),
    "ReferencedPerformedProcedureStepSequence": ("X/Z/D", "X"),
    "ContrastBolusAgent": ("Z/D", "Z"),
    # Free text that may name anyone.
    "ImageComments": ("X", "X"),
    "AcquisitionComments": ("X", "X"),
    "DerivationDescription": ("X", "X"),
    "IdentifyingComments": ("X", "X"),
    # Dates and times.
    "StudyDate": ("Z", "Z"),
    "StudyTime": ("Z", "Z"),
    "SeriesDate": ("X/D", "X"),
    "SeriesTime": ("X/D", "X"),
    "AcquisitionDate": ("X/Z", "X"),
    "AcquisitionTime": ("X/Z", "X"),
    "AcquisitionDateTime": ("X/Z/D", "X"),
    "ContentDate": ("Z/D", "Z"),
    "ContentTime": ("Z/D", "Z"),
    "InstanceCreationDate": ("X/D", "X"),
    "InstanceCreationTime": ("X/Z/D", "X"),
    "DateOfSecondaryCapture": ("X", "X"),
    "TimezoneOffsetFromUTC": ("X", "X"),
    # Institution, equipment and the people involved.
    "InstitutionName": ("X/Z/D", "X"),
    "InstitutionAddress": ("X", "X"),
    "InstitutionalDepartmentName": ("X", "X"),
    "InstitutionCodeSequence": ("X/Z/D", "X"),
    "StationName": ("X/Z/D", "X"),
    "DeviceSerialNumber": ("X/Z/D", "X"),
    "PlateID": ("X", "X"),
    "CassetteID": ("X", "X"),
    "GantryID": ("X", "X"),
    "DetectorID": ("X/D", "X"),
    "ReferringPhysicianName": ("Z", "Z"),
    "ReferringPhysicianAddress": ("X", "X"),
    "ReferringPhysicianTelephoneNumbers": ("X", "X"),
    "PhysiciansOfRecord": ("X", "X"),
    "PerformingPhysicianName": ("X", "X"),
    "NameOfPhysiciansReadingStudy": ("X", "X"),
    "RequestingPhysician": ("X", "X"),
    "OperatorsName": ("X/Z/D", "X"),
    "VerifyingObserverName": ("D", "D"),
    "VerifyingOrganization": ("D", "D"),
    "PersonName": ("D", "D"),
    # Whole structures that may hold copies of any of the above.
    "OriginalAttributesSequence": ("X", "X"),
    "IconImageSequence": ("X", "X"),
    "DigitalSignaturesSequence": ("X", "X"),
    "DataSetTrailingPadding": ("X", "X"),
    # UIDs that identify instances (the class UIDs, such as SOPClassUID, are kept).
    "StudyInstanceUID": ("U", "U"),
    "SeriesInstanceUID": ("U", "U"),
    "SOPInstanceUID": ("U", "U"),
    "FrameOfReferenceUID": ("U", "U"),
    "SynchronizationFrameOfReferenceUID": ("U", "U"),
    "ReferencedSOPInstanceUID": ("U", "U"),
    "ReferencedFrameOfReferenceUID": ("U", "U"),
    "InstanceCreatorUID": ("U", "U"),
    "IrradiationEventUID": ("U", "U"),
    "ConcatenationUID": ("U", "U"),
    "DimensionOrganizationUID": ("U", "U"),
    "UID": ("U", "U"),
    "ReferencedImageSequence": ("X/Z/U*", "U"),
    "SourceImageSequence": ("X/Z/U*", "U"),
}

_ACTIONS = {tag_for_keyword(keyword): applied for keyword, (_, applied) in BASIC_PROFILE.items()}

#: The dummy value of action D, per VR; numbers become 0.
_DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
          "UT": "ANONYMIZED", "DA": "19000101", "TM": "000000", "DT": "19000101000000"}

#: DeidentificationMethod is a LO: 64 characters at most.
METHOD = "DICOM PS3.15 E.1 Basic Profile; pixels not checked"


class Deidentifier:
    """One de-identification session: the secret that makes the new UIDs consistent across its files.

    Give the same secret to later sessions whose files must join the same new studies; without one,
    a random secret makes this session's UIDs unlinkable to any other's.
    """

    def __init__(self, secret: bytes | str | None = None):
        key = secret.encode() if isinstance(secret, str) else secret
        if key == b"":
            raise ValueError("the secret is empty; pass None for a random one")
        self._key = key if key is not None else secrets.token_bytes(32)

    def uid(self, original: str) -> str:
        """The new UID for ``original``: the same for the same original, in this session and any with its secret."""
        digest = hmac.new(self._key, str(original).encode(), hashlib.sha256).hexdigest()
        return generate_uid(entropy_srcs=[digest])


def deidentify(dataset: Dataset, deidentifier: Deidentifier, patient_id: str = "") -> Dataset:
    """A de-identified copy of ``dataset`` (the input is left untouched); see the module's docstring.

    ``patient_id`` is a pseudonym to keep in PatientID (e.g. a stable study code), never the real ID.
    """
    original_id = str(dataset.get("PatientID", "") or "")
    if patient_id and patient_id in (original_id, str(dataset.get("PatientName", ""))):
        raise ValueError("patient_id must be a pseudonym, not the patient's own ID or name")
    clean = copy.deepcopy(dataset)
    _apply_profile(clean, deidentifier)
    clean.PatientID = patient_id
    clean.PatientIdentityRemoved = "YES"
    clean.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    clean.DeidentificationMethodCodeSequence = [code]
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        clean.file_meta = FileMetaDataset()
        clean.file_meta.TransferSyntaxUID = meta.TransferSyntaxUID
        clean.file_meta.MediaStorageSOPClassUID = meta.MediaStorageSOPClassUID
        clean.file_meta.MediaStorageSOPInstanceUID = deidentifier.uid(meta.MediaStorageSOPInstanceUID)
    return clean


def deidentify_file(src: str | Path, dst: str | Path, deidentifier: Deidentifier, patient_id: str = "") -> Path:
    """Read a DICOM file, de-identify it and write it to ``dst`` (which may be ``src``)."""
    clean = deidentify(pydicom.dcmread(src), deidentifier, patient_id)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean.save_as(dst, enforce_file_format=True)
    return dst


def _apply_profile(dataset: Dataset, deidentifier: Deidentifier) -> None:
    """Apply the actions in place, then recurse into the sequences that remain."""
    for tag in list(dataset.keys()):
        if tag.is_private or tag.group & 0xFF00 in (0x5000, 0x6000):
            del dataset[tag]  # private, curve or overlay: checked on the tag, before pydicom decodes the value
            continue
        action = _ACTIONS.get(tag)
        if action == "X":
            del dataset[tag]
            continue
        element = dataset[tag]
        if action == "Z":
            element.value = empty_value_for_VR(element.VR)
        elif action == "D":
            element.value = _DUMMY.get(element.VR, 0)
        elif action == "U" and element.VR == "UI" and element.value:
            element.value = [deidentifier.uid(v) for v in element.value] if element.VM > 1 else deidentifier.uid(element.value)
        if element.VR == "SQ":
            for item in element.value:
                _apply_profile(item, deidentifier)
