"""The policy on the embedded default model: batched sampling, trajectories, log-probs, versions."""

import json
import re

import numpy as np
import pytest
import torch

from optim.policy import ModelLoadError, Policy, candidate_seeds, main
from optim.versions import VersionStore
from tests.conftest import FAST, PROMPT


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_group_is_drawn_in_one_batched_unet_call_per_step(policy):
    calls = []
    hook = policy.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = policy.sample(PROMPT, n=3, seed=0, **FAST)
    finally:
        hook.remove()
    assert calls == [6] * FAST["steps"]  # 3 candidates x (unconditional + conditional), once per step
    trajectory = result.trajectory
    assert len(result.images) == 3 and result.images[0].size == (64, 64)
    assert trajectory.latents.shape == (3, FAST["steps"] + 1, 4, 16, 16)
    assert trajectory.log_probs.shape == (3, FAST["steps"])
    assert torch.isfinite(trajectory.log_probs).all()
    assert trajectory.seeds == candidate_seeds(0, 3)


def test_same_seed_same_images_different_seed_different_images(policy):
    a = policy.sample(PROMPT, n=2, seed=5, **FAST)
    b = policy.sample(PROMPT, n=2, seed=5, **FAST)
    c = policy.sample(PROMPT, n=2, seed=6, **FAST)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert torch.equal(a.trajectory.log_probs, b.trajectory.log_probs)
    assert np.abs(pixels(a.images) - pixels(c.images)).mean() > 2.0
    assert np.abs(pixels(a.images[:1]) - pixels(a.images[1:])).mean() > 2.0  # candidates differ too


def test_a_candidate_can_be_redrawn_alone_from_its_seed(policy):
    group = policy.sample(PROMPT, n=3, seed=11, **FAST)
    alone = policy.sample(PROMPT, seeds=[group.trajectory.seeds[2]], **FAST)
    assert torch.allclose(alone.trajectory.latents[0], group.trajectory.latents[2], atol=1e-3)
    assert np.abs(pixels(alone.images)[0] - pixels(group.images)[2]).max() <= 2


def test_ratio_is_exactly_one_before_any_update(policy):
    trajectory = policy.sample(PROMPT, n=2, seed=1, **FAST).trajectory
    ratio = torch.exp(policy.log_probs(trajectory) - trajectory.log_probs)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_versions_change_log_probs_and_roll_back_to_the_same_samples(tmp_path):
    policy = Policy.load()  # its own copy: this test changes the adapter weights
    store = VersionStore(tmp_path / "versions")
    base = policy.open_versions(store)
    assert base.id == "v0" and store.current == "v0"
    before = policy.sample(PROMPT, n=2, seed=3, **FAST)

    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in policy.lora_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    changed_log_probs = policy.log_probs(before.trajectory)
    assert (changed_log_probs - before.trajectory.log_probs).abs().max() > 1e-3
    with policy.reference():  # adapters off: the base network again
        assert torch.allclose(policy.log_probs(before.trajectory), before.trajectory.log_probs, atol=1e-6)
    v1 = policy.save_version(store, algorithm="grpo", metrics={"loss": 0.5})
    assert (v1.id, v1.parent, store.current) == ("v1", "v0", "v1")
    after = policy.sample(PROMPT, n=2, seed=3, **FAST)
    assert not np.array_equal(pixels(after.images), pixels(before.images))

    reloaded = Policy.load()  # a fresh process would do this: reads v1 from disk
    assert reloaded.open_versions(store).id == "v1"
    assert np.array_equal(pixels(reloaded.sample(PROMPT, n=2, seed=3, **FAST).images), pixels(after.images))

    store.set_current("v0")  # rollback
    reloaded.use_version(store, store.current)
    assert np.array_equal(pixels(reloaded.sample(PROMPT, n=2, seed=3, **FAST).images), pixels(before.images))
    meta = json.loads((tmp_path / "versions" / "v1" / "meta.json").read_text())
    assert meta["algorithm"] == "grpo" and meta["metrics"] == {"loss": 0.5}


def test_missing_or_unsupported_model_folders_get_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model folder not found: {tmp_path / 'nope'}"):
        Policy.load(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        Policy.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))  # SDXL loads now
    with pytest.raises(ModelLoadError, match="KandinskyV22Pipeline, which is not supported"):
        Policy.load(tmp_path)
    with pytest.raises(ModelLoadError, match=f"model_index.json is a file; a model is a diffusers pipeline folder: "
                                             f"pass its folder, {tmp_path}$"):
        Policy.load(tmp_path / "model_index.json")


def test_bad_sampling_requests_are_refused_with_reasons(policy):
    with pytest.raises(ValueError, match="prompt is empty"):
        policy.sample("   ", n=2)
    with pytest.raises(ValueError, match="n must be between 1 and 64"):
        policy.sample(PROMPT, n=0)
    with pytest.raises(ValueError, match="eta must be in"):
        policy.sample(PROMPT, n=1, eta=0.0)
    with pytest.raises(ValueError, match="guidance must be at least 1.0 .* got nan"):  # NaN fails every comparison
        policy.sample(PROMPT, n=1, guidance=float("nan"))


def test_cli_writes_pngs_and_log_probs(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sample", "--prompt", "CT: axial slice of the abdomen", "-n", "2", "--seed", "4", "--out", str(out), "--steps", "3"])
    assert code == 0
    record = json.loads((out / "samples.json").read_text())
    assert [c["seed"] for c in record["candidates"]] == candidate_seeds(4, 2)
    assert all(len(c["log_probs"]) == 3 for c in record["candidates"])
    assert (out / "candidate_0.png").exists() and (out / "candidate_1.png").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["sample", "--prompt", "x", "--out", str(tmp_path), "--model", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: model folder not found: {tmp_path / 'missing'}"
    code = main(["sample", "--prompt", "CT: axial", "--out", str(tmp_path), "--version", "v9", "--workdir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --version v9: {tmp_path} holds no versions (no {tmp_path / 'versions'} folder)"
    assert not (tmp_path / "versions").exists()  # nothing left behind
    VersionStore(tmp_path / "versions")
    code = main(["sample", "--prompt", "CT: axial", "--out", str(tmp_path), "--version", "v9", "--workdir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: unknown version 'v9'; known versions: none"
    taken = tmp_path / "taken.txt"
    taken.write_text("")
    assert main(["sample", "--prompt", "CT: axial", "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {taken} is a file; the candidates are written into a folder"


def test_trajectory_round_trips_through_bytes_and_rescores_exactly(policy):
    from optim.trajectory import Trajectory

    trajectory = policy.sample(PROMPT, n=2, seed=4, **FAST).trajectory
    data = trajectory.to_bytes()
    assert b"__metadata__" in data[:4096] and not data.startswith(b"\x80")  # safetensors, not a pickle
    back = Trajectory.from_bytes(data)
    assert (back.prompt, back.seeds, back.settings) == (trajectory.prompt, trajectory.seeds, trajectory.settings)
    for name in ("timesteps", "latents", "log_probs", "prompt_embeds", "negative_embeds"):
        assert torch.equal(getattr(back, name), getattr(trajectory, name))
    assert torch.equal(policy.log_probs(back), back.log_probs)  # a stored group's ratio starts at exactly 1


def test_joining_draws_that_differ_names_the_field_that_differs():
    from dataclasses import replace

    from optim.trajectory import SamplingSettings, Trajectory

    steps = 3
    base = Trajectory(PROMPT, [1], SamplingSettings(steps=steps), torch.tensor([900.0, 600.0, 300.0]),
                      torch.zeros(1, steps + 1, 1, 2, 2), torch.zeros(1, steps), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4),
                      noise_level=0.7)
    other = replace(base, seeds=[2])
    assert Trajectory.join([base, other]).seeds == [1, 2]
    cases = {
        "noise level 0.7 vs 0.35": replace(other, noise_level=0.35),
        "fixed steps [] vs [2]": replace(other, fixed_steps=[2]),
        "prompt": replace(other, prompt="MRI: brain"),
        "timestep 1 600 vs 500": replace(other, timesteps=torch.tensor([900.0, 500.0, 300.0])),
        "sampling settings": replace(other, settings=SamplingSettings(steps=steps, eta=0.5)),
    }
    for expected, part in cases.items():
        with pytest.raises(ValueError, match=rf"^trajectories of different [a-z ,]+ cannot form one group: .*{re.escape(expected)}"):
            Trajectory.join([base, part])
    with pytest.raises(ValueError, match=r"different noise level, fixed steps cannot form one group"):
        Trajectory.join([base, replace(other, noise_level=0.35, fixed_steps=[2])])


def test_a_workdir_follows_its_model_when_the_folder_moves_and_refuses_other_weights(policy, tmp_path):
    """Versions name their base model by a fingerprint of its files: a moved checkout or model folder keeps its
    versions; a folder whose weights differ (here one float near the end of the UNet's file) is refused."""
    import shutil

    from optim.versions import model_fingerprint

    moved = shutil.copytree(policy.model_path, tmp_path / "moved")
    assert model_fingerprint(moved) == policy.base_fingerprint
    store = VersionStore(tmp_path / "versions")
    store.save(policy.lora_state_dict(), parent=None, algorithm=None, base_model=str(policy.model_path),
               base_fingerprint=policy.base_fingerprint)
    assert Policy.load(moved).use_version(store, "v0").id == "v0"

    weights = moved / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # the file is 15 MB: the fingerprint reads its first and last MiB
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"version v0 was trained on other weights than the loaded model's: "
                                             r".* \(files [0-9a-f]{16}\) against .*moved \(files [0-9a-f]{16}\)"):
        Policy.load(moved).use_version(store, "v0")


def test_evaluate_refuses_a_folder_that_is_not_a_model_in_one_line_before_training_its_judge(tmp_path, capsys,
                                                                                             monkeypatch):
    from optim import evaluate

    monkeypatch.setattr(evaluate, "train_classifier", lambda: pytest.fail("the judge was trained"))
    assert evaluate.main(["--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: model folder not found: {tmp_path / 'nope'}"


def test_a_model_with_pickled_weights_is_refused_saying_why_without_unpickling(policy, tmp_path):
    import shutil

    folder = shutil.copytree(policy.model_path, tmp_path / "pickled")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ModelLoadError, match=r"holds pickled weights \(unet/diffusion_pytorch_model.bin\) and no "
                                             r"safetensors for them: the workbench never unpickles a checkpoint"):
        Policy.load(folder)
