"""The selector: rule gates by hand, the shipped network on phantoms, training on a small demo set, the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.demo_set import degrade, make_demo_set
from data.modalities import MODALITIES, modality_of_prompt
from data.phantoms import all_prompts, make_phantom
from optim.selector.model import Selector, SelectorConfig, SelectorNet, as_unit_array, gate_reasons
from workbench.selector import main
from optim.selector.training import Examples, TrainingConfig, load_examples, split_images, train_selector, training_loss

GATES = SelectorConfig()


@pytest.fixture(scope="module")
def selector():
    return Selector.load()


def test_gates_name_each_fault_in_plain_words():
    phantom = make_phantom("CT", 3).image
    assert gate_reasons(phantom, GATES) == []
    assert gate_reasons(np.full((64, 64), 0.3, np.float32), GATES) == ["blank image"]
    broken = phantom.copy()
    broken[0, :3] = np.nan
    assert gate_reasons(broken, GATES) == ["image has 3 NaN or infinite pixels"]
    flat = 0.5 + 0.1 * np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)  # 1st-99th percentile: 0.098
    assert gate_reasons(flat, GATES) == ["too little contrast: dynamic range 0.10 below 0.15"]
    harsh = np.where(phantom > 0.3, 1.0, 0.0).astype(np.float32)
    assert gate_reasons(harsh, GATES) == ["100% of pixels clipped to black or white (at most 50%)"]
    assert gate_reasons(phantom[:, :20], GATES) == ["wrong size 20x64 (at least 32 pixels a side, aspect at most 2)"]


def test_images_of_every_kind_come_to_the_same_unit_scale():
    pixels = make_phantom("MRI", 1).image
    eight = Image.fromarray(np.rint(pixels * 255).astype(np.uint8))
    sixteen = Image.fromarray(np.rint(pixels * 65535).astype(np.uint16))
    assert np.abs(as_unit_array(eight) - pixels).max() <= 0.5 / 255 + 1e-6
    assert np.abs(as_unit_array(sixteen) - pixels).max() <= 0.5 / 65535 + 1e-6
    assert np.abs(as_unit_array(eight.convert("RGB")) - pixels).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("modality,prompt", [("CT", "CT: axial slice of the abdomen"), ("MRI", "MRI: axial brain"),
                                             ("XRAY", "chest X-ray: frontal view"), ("OCT", "OCT: retinal layers")])
def test_shipped_selector_passes_clean_phantoms_and_catches_the_wrong_modality(selector, modality, prompt):
    images = [make_phantom(modality, seed).image for seed in range(50, 70)]
    verdicts = selector.judge(images, prompt=prompt)
    assert sum(v.passed for v in verdicts) >= 18, [v.summary() for v in verdicts]  # a learned score: 90% at least
    assert all(v.asked_modality == modality and v.modality_probabilities[modality] > 0.9 for v in verdicts)
    other = "OCT" if modality != "OCT" else "CT"
    wrong = selector.judge(images, modality=other)
    assert not any(v.passed for v in wrong)
    names = {"CT": "CT", "MRI": "MRI", "XRAY": "chest X-ray", "OCT": "OCT"}
    assert all(v.reasons[-1].startswith(f"looks like {names[modality]} (") for v in wrong)
    assert all(v.reasons[-1].endswith(f"; prompt asks for {names[other]}") for v in wrong)


def test_shipped_selector_scores_degraded_images_lower_and_rejects_blanks(selector):
    rng = np.random.default_rng(0)
    clean = [make_phantom("MRI", seed).image for seed in range(60, 66)]
    noisy = [degrade(image, "noise", 0.9, rng) for image in clean]
    blank = degrade(clean[0], "blank", 1.0, rng)
    verdicts = selector.judge(clean + noisy + [blank], prompt="MRI: axial brain")
    quality = np.array([v.quality for v in verdicts])
    assert quality[6:12].max() < quality[:6].min()
    assert any(r.startswith("quality 0.") and r.endswith("below 0.50") for v in verdicts[6:12] for r in v.reasons)
    assert not verdicts[-1].passed and "blank image" in verdicts[-1].reasons
    with pytest.raises(ValueError, match="unknown modality 'PET'"):
        selector.judge(clean, modality="PET")


def test_expert_level_weights_the_quality_loss_and_never_changes_the_label():
    torch.manual_seed(0)
    net = SelectorNet(8)
    images = torch.rand(2, 1, 64, 64)
    examples = Examples(
        images=images, modality=torch.tensor([0, 1]), gates_pass=torch.tensor([True, True]),
        row_image=torch.tensor([0, 1]), score=torch.tensor([1.0, 0.0]), rating=np.array([3.0, 1.0]),
        weight=torch.tensor([3.0, 1.0]), prompt_matches=torch.tensor([True, True]), asked=torch.tensor([0, 1]),
    )
    rows, no_flip = torch.tensor([0, 1]), torch.tensor([False, False])
    loss = training_loss(net, examples, rows, no_flip)
    quality_logits, modality_logits = net(images)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(quality_logits, torch.tensor([1.0, 0.0]), reduction="none")
    by_hand = (3 * bce[0] + 1 * bce[1]) / 4 + torch.nn.functional.cross_entropy(modality_logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_training_on_a_small_demo_set_splits_by_image_and_writes_a_loadable_selector(tmp_path):
    csv = make_demo_set(tmp_path / "demo", n_images=24, seed=3)
    examples, errors = load_examples(csv, None, TrainingConfig(), GATES)
    train, held = split_images(len(examples.images), 0.25, seed=0)
    assert errors == [] and not train & held and len(held) == 6 and len(train | held) == 24
    report = train_selector(csv, tmp_path / "selector", TrainingConfig(epochs=2))
    assert report["validation_images"] == 5 and report["training_images"] == 19
    assert -1.0 <= report["quality_spearman"] <= 1.0 and 0.0 <= report["modality_accuracy"] <= 1.0
    reloaded = Selector.load(tmp_path / "selector")
    assert json.loads((tmp_path / "selector" / "selector.json").read_text())["report"]["training_rows"] == report["training_rows"]
    assert reloaded.judge([make_phantom("CT", 0).image], prompt="CT: axial slice")[0].quality is not None


def test_score_command_prints_a_verdict_per_file(tmp_path, capsys):
    from data.images import write_png

    good = write_png(tmp_path / "good.png", make_phantom("OCT", 2).image)
    blank = write_png(tmp_path / "blank.png", np.full((64, 64), 0.4, np.float32))
    assert main(["score", "--prompt", "OCT: retinal layers", str(good), str(blank)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{good}: passed: quality ") and "chest X-ray 0.0" in lines[0]
    assert lines[1].startswith(f"{blank}: rejected: blank image")
    assert main(["score", "--model", str(tmp_path / "nowhere"), str(good)]) == 2
    assert "is not a selector folder" in capsys.readouterr().err


def test_default_generator_candidates_pass_their_prompt_and_fail_another_modalitys(policy, selector):
    own, wrong, judged_wrong = 0, 0, 0
    for seed, modality in enumerate(MODALITIES):
        prompt = next(p for p in all_prompts() if modality_of_prompt(p) == modality)
        images = policy.sample(prompt, n=4, seed=seed, steps=10).images
        own += sum(v.passed for v in selector.judge(images, prompt=prompt))
        for other in MODALITIES:
            if other != modality:
                verdicts = selector.judge(images, modality=other)
                wrong += sum(not v.passed for v in verdicts)
                judged_wrong += len(verdicts)
    assert own >= 12  # of 16 well-formed candidates (the benchmark reports the rate on 152)
    assert wrong / judged_wrong >= 0.9  # the bar for the modality check


def test_train_command_refuses_an_out_that_is_a_file_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("workbench.selector.train_selector", lambda *args, **kwargs: pytest.fail("it trained"))
    taken = tmp_path / "selector.txt"
    taken.write_text("")
    assert main(["train", "--ratings", str(tmp_path / "ratings.csv"), "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {taken} is a file; the selector is written into a folder"
