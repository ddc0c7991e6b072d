"""Procedural phantoms: deterministic, one per modality, findings that change the pixels."""

import numpy as np
import pytest

from data.modalities import MODALITIES, canonical_modality, modality_of_prompt
from data.phantoms import FINDINGS, all_prompts, make_phantom, random_phantom


def test_same_seed_same_image_and_different_seed_different_image():
    a, b, c = make_phantom("CT", 3), make_phantom("CT", 3), make_phantom("CT", 4)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.image.shape == (64, 64)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0


@pytest.mark.parametrize("modality", MODALITIES)
def test_each_finding_changes_the_image_and_is_named_in_the_prompt(modality):
    plain = make_phantom(modality, 7)
    assert modality_of_prompt(plain.prompt) == modality
    for finding in FINDINGS[modality]:
        found = make_phantom(modality, 7, finding, side="left")
        assert finding.split()[-1] in found.prompt  # "lesion", "opacity", "heart", "fluid", "cysts"
        # same seed, same anatomy: the finding alone moves a visible share of pixels
        assert np.mean(np.abs(found.image - plain.image) > 0.1) > 0.01, finding


def test_ct_lesion_sits_on_the_patients_side():
    # radiological convention: the patient's left is on the image's right
    left = make_phantom("CT", 1, "lesion", side="left", size="large", brightness="bright")
    plain = make_phantom("CT", 1)
    change = np.abs(left.image - plain.image)
    assert change[:, 32:].sum() > 5 * change[:, :32].sum()
    assert left.prompt == "CT: axial slice of the abdomen with a large bright lesion on the left"


def test_prompts_cover_every_modality_and_unknown_input_is_refused():
    prompts = all_prompts()
    assert {modality_of_prompt(p) for p in prompts} == set(MODALITIES)
    assert random_phantom(5).prompt in prompts
    assert modality_of_prompt("ultrasound: liver") is None
    assert modality_of_prompt("  cxr: right lower lobe opacity") == "XRAY"
    assert modality_of_prompt("CT axial slice") is None  # no prefix, no guess
    assert [canonical_modality(n) for n in ("MR", "x-ray", "DX", "opt", "PET", None)] == ["MRI", "XRAY", "XRAY", "OCT", None, None]
    with pytest.raises(ValueError, match="unknown modality 'PET'"):
        make_phantom("PET", 0)
    with pytest.raises(ValueError, match="OCT has no finding 'lesion'"):
        make_phantom("OCT", 0, "lesion")
