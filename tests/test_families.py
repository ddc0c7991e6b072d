"""Every generator family on a tiny pipeline with random weights, saved as a local folder and loaded as a host's
checkpoint would be: sampling, ratio 1, one GRPO and one DPO step in the right direction, versions and
rollback, a LoRA file that travels, and a round of the control room. Plus the loader's refusals and the
deterministic last DDIM step of ``set_alpha_to_one`` schedulers.

Families: Stable Diffusion 1.x/2.x ("sd"), SDXL ("sdxl"), SD 3 / 3.5 ("sd3"), FLUX.1-dev ("flux"), built by
``tests/family_models.py`` (32 px, a few MB each). Sampling speed against each family's own diffusers
pipeline is a benchmark, not a test: ``tests/benchmarks/bench_families.py``.
"""

import json
import math

import numpy as np
import pytest
import torch

from optim.preference.dpo import DPOConfig, dpo_terms
from optim.generators import Flux, StableDiffusion, StableDiffusion3, StableDiffusionXL
from optim.preference.groups import RankedGroup
from optim.policy import ModelLoadError, Policy
from optim.selector.model import Selector, SelectorConfig
from optim.trajectory import Trajectory
from optim.preference.update import UpdateConfig, apply_update, dpo_backward, dpo_pairs
from optim.versions import VersionStore
from tests.family_models import FAMILIES, build

PROMPT = "CT: axial slice with a bright lesion"
STEPS = 3
FAST = dict(steps=STEPS, guidance=3.0, eta=1.0)
CLASSES = {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3, "flux": Flux}
IDS = ["c0", "c1", "c2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build(family, root / family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def ranked(trajectory) -> RankedGroup:
    """c0 best, c2 worst: c0's advantage is positive, c2's negative."""
    return RankedGroup("g", IDS, trajectory, rankings=[([["c0"], ["c1"], ["c2"]], 2)])


def test_loads_by_family_and_samples_a_group_in_one_batched_call_per_step(folders, family):
    policy = Policy.load(folders[family])
    assert type(policy) is CLASSES[family] and isinstance(policy, Policy)
    calls = []
    hook = policy.denoiser.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        result = policy.sample(PROMPT, n=3, seed=0, **FAST)
    finally:
        hook.remove()
    guided = 1 if family == "flux" else 2  # FLUX-dev: distilled guidance, one call; the others: CFG halves in one call
    assert calls == [3 * guided] * STEPS
    trajectory = result.trajectory
    assert len(result.images) == 3 and result.images[0].size == (policy.image_size(),) * 2
    assert trajectory.latents.shape == (3, STEPS + 1, *policy.latent_shape())
    assert trajectory.log_probs.shape == (3, STEPS) and torch.isfinite(trajectory.log_probs).all()
    if family in ("sd3", "flux"):
        assert trajectory.noise_level == pytest.approx(0.7) and trajectory.sigmas[0] == 1 and trajectory.sigmas[-1] == 0
    alone = policy.sample(PROMPT, seeds=[trajectory.seeds[2]], **FAST)  # a candidate re-drawn alone from its seed
    assert torch.allclose(alone.trajectory.latents[0], trajectory.latents[2], atol=1e-4)


def test_ratio_is_exactly_one_before_an_update_also_after_storage_and_regrouping(folders, family):
    policy = Policy.load(folders[family])
    trajectory = policy.sample(PROMPT, n=3, seed=1, **FAST).trajectory
    assert torch.equal(policy.log_probs(trajectory), trajectory.log_probs)
    back = Trajectory.from_bytes(trajectory.to_bytes())  # as the room stores it
    assert torch.equal(policy.log_probs(back), trajectory.log_probs)
    for name in ("pooled_embeds", "negative_pooled_embeds", "sigmas"):
        value = getattr(trajectory, name)
        assert (value is None and getattr(back, name) is None) or torch.equal(value, getattr(back, name))
    regrouped = Trajectory.join([back.select([2]), back.select([0])])  # the rejection sampler's survivors
    regrouped.log_probs = policy.log_probs(regrouped)
    assert torch.equal(policy.log_probs(regrouped), regrouped.log_probs)


def test_step_std_is_the_std_each_step_is_drawn_and_scored_with(folders, family):
    """GRPO's noise-aware step weighting reads a step's std from the schedule, without a network call."""
    policy = Policy.load(folders[family])
    trajectory = policy.sample(PROMPT, n=2, seed=3, **FAST).trajectory
    stds = [policy.step_std(trajectory, j) for j in trajectory.scored_steps()]
    assert stds == pytest.approx([policy.score_step(trajectory, j)[2] for j in trajectory.scored_steps()], rel=1e-6)
    assert stds[0] > stds[-1] > 0  # the noise shrinks along the chain


def test_one_grpo_step_raises_the_log_prob_of_the_positive_advantage_chain(folders, family, tmp_path):
    policy = Policy.load(folders[family])
    trajectory = policy.sample(PROMPT, n=3, seed=2, **FAST).trajectory
    store = VersionStore(tmp_path / "versions")
    policy.open_versions(store)
    config = UpdateConfig(algorithm="grpo", epochs=1, train_fraction=1.0, kl_budget=float("inf"), seed=0,
                          learning_rate=1e-3)
    result = apply_update(policy, store, [ranked(trajectory)], config)
    assert result.applied and result.version.id == "v1", result.message
    steps = trajectory.scored_steps()
    change = (policy.log_probs(trajectory) - trajectory.log_probs)[:, steps].mean(dim=1)
    assert change[0] > 0 > change[2], change  # the best chain more likely, the worst less


def test_one_dpo_step_raises_the_winners_implicit_reward(folders, family):
    policy = Policy.load(folders[family])
    group = ranked(policy.sample(PROMPT, n=3, seed=3, **FAST).trajectory)
    config = UpdateConfig(algorithm="dpo", dpo=DPOConfig(noise_draws=2))
    parameters = policy.lora_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    before = dpo_terms(policy, *dpo_pairs([group]), config.dpo, torch.Generator().manual_seed(5))
    assert torch.equal(before.margin, torch.zeros_like(before.margin))  # the policy is the reference
    dpo_backward(policy, [group], config, torch.Generator().manual_seed(5))
    optimizer.step()
    with torch.no_grad():
        after = dpo_terms(policy, *dpo_pairs([group]), config.dpo, torch.Generator().manual_seed(5))
    assert (after.winner_reward > after.loser_reward).all(), after.margin
    assert after.winner_reward.mean() > 0 and after.loss < math.log(2)


def test_a_version_saves_reloads_rolls_back_and_travels_as_a_lora_file(folders, family, tmp_path):
    policy = Policy.load(folders[family])
    store = VersionStore(tmp_path / "versions")
    assert policy.open_versions(store).id == "v0"
    before = policy.sample(PROMPT, n=2, seed=4, **FAST)
    generator = torch.Generator().manual_seed(0)
    policy.load_lora_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in policy.lora_state_dict().items()})
    with policy.reference():  # adapters off: the base network again
        assert torch.equal(policy.log_probs(before.trajectory), before.trajectory.log_probs)
    v1 = policy.save_version(store, algorithm="grpo")
    after = policy.sample(PROMPT, n=2, seed=4, **FAST)
    assert np.abs(pixels(after.images) - pixels(before.images)).max() > 0

    reloaded = Policy.load(folders[family])  # a fresh process: reads v1 from disk
    assert reloaded.open_versions(store).id == v1.id
    assert np.array_equal(pixels(reloaded.sample(PROMPT, n=2, seed=4, **FAST).images), pixels(after.images))
    store.set_current("v0")  # rollback
    reloaded.use_version(store, "v0")
    assert np.array_equal(pixels(reloaded.sample(PROMPT, n=2, seed=4, **FAST).images), pixels(before.images))

    exported = policy.export_lora(store, v1.id, tmp_path / "v1.safetensors")  # read by diffusers' own load_lora_weights
    started = Policy.load(folders[family], lora=exported)
    assert np.abs(pixels(started.sample(PROMPT, n=2, seed=4, **FAST).images) - pixels(after.images)).max() <= 1


def test_the_control_room_runs_a_round(folders, family, tmp_path):
    from workbench import ControlRoom, RoomConfig

    config = RoomConfig(survivors=3, batch_size=3, max_draws=3, steps=STEPS, guidance=3.0, pass_rate_probe=0)
    room = ControlRoom(model=folders[family], workdir=tmp_path / "room", selector="gates", config=config)
    room.sampler.selector = Selector.gates_only(SelectorConfig(min_std=0.0, min_dynamic_range=0.0, max_clipped_fraction=1.0))
    group = room.generate(PROMPT, seed=1)
    assert group.version == "v0" and len(group.survivors) == 3
    a, b, c = (s.id for s in group.survivors)
    room.rank(group.id, [[c], [a], [b]], expert="alice")
    numbers = room.losses(group.id)
    assert [x["ratio"] for x in numbers["grpo"]["candidates"]] == [1.0, 1.0, 1.0]
    assert numbers["dpo"]["loss"] == pytest.approx(math.log(2))
    result = room.apply_update(algorithm="grpo", who="alice")
    assert result.applied and result.version.id == "v1", result.message
    newer, older = room.sample(PROMPT, n=2, seed=9, version="v1"), room.sample(PROMPT, n=2, seed=9, version="v0")
    assert not np.array_equal(pixels(newer), pixels(older))
    assert room.rollback("v0")["current"]
    assert np.array_equal(pixels(room.sample(PROMPT, n=2, seed=9)), pixels(older))
    exported = room.export("trl", tmp_path / "prefs.parquet")
    assert exported.exists()


# ---------------------------------------------------------------------- loading and schedulers


def test_unsupported_pipelines_are_refused_naming_the_class_found(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelLoadError, match="holds a KandinskyV22Pipeline, which is not supported: the workbench loads "
                                             "Stable Diffusion 1.x/2.x \\(StableDiffusionPipeline\\); Stable Diffusion XL"):
        Policy.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError, match="could not load the pipeline in"):  # a family we load, but no components
        Policy.load(tmp_path)


def test_a_family_class_refuses_another_familys_folder(folders):
    with pytest.raises(ModelLoadError, match="holds a FLUX.1 model, not a Stable Diffusion XL one"):
        StableDiffusionXL.load(folders["flux"])
    assert type(StableDiffusion.load(folders["sdxl"])) is StableDiffusionXL  # SDXL is a kind of SD


def test_set_alpha_to_one_makes_the_last_ddim_step_deterministic_and_unscored(tmp_path):
    policy = Policy.load(build("sd", tmp_path / "alpha-one", set_alpha_to_one=True))
    assert policy.scheduler.final_alpha_cumprod == 1.0
    trajectory = policy.sample(PROMPT, n=3, seed=0, **FAST).trajectory
    assert trajectory.fixed_steps == [STEPS - 1] and trajectory.scored_steps() == list(range(STEPS - 1))
    assert torch.equal(trajectory.log_probs[:, -1], torch.zeros(3))  # no log-probability, not -inf or nan
    assert torch.isfinite(trajectory.log_probs).all()
    _, mean, std = policy.score_step(trajectory, STEPS - 1)
    assert std == 0 and torch.allclose(mean, trajectory.latents[:, -1], atol=1e-6)  # it moved to its mean
    back = Trajectory.from_bytes(trajectory.to_bytes())
    assert back.fixed_steps == [STEPS - 1] and torch.equal(policy.log_probs(back), trajectory.log_probs)
    store = VersionStore(tmp_path / "versions")
    policy.open_versions(store)
    config = UpdateConfig(algorithm="grpo", epochs=2, train_fraction=1.0, seed=0)
    result = apply_update(policy, store, [ranked(trajectory)], config)
    assert result.applied, result.message  # finite: the deterministic step is left out
    assert result.metrics["trained_steps"] == [list(range(STEPS - 1))]
    assert math.isfinite(result.metrics["loss_last"]) and math.isfinite(result.metrics["kl_from_previous"])


# ---------------------------------------------------------------------- the flow-matching SDE kernel


def test_flow_sde_step_matches_the_formulas_by_hand():
    from optim.generators.kernels import flow_sde_step

    # s = 0.5 -> 0.25, a = 0.7: std_s = 0.7 sqrt(0.5 / 0.5) = 0.7; dt = -0.25
    # mean = x (1 + 0.49 / 1 * -0.25) + v (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 x - 0.31125 v
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.2)
    x_prev, log_prob, mean, std = flow_sde_step(v, x, 0.5, 0.25, 0.9, 0.7, noise=torch.zeros(1, 1))
    assert std == pytest.approx(0.35) and mean.item() == pytest.approx(0.8775 - 0.31125 * 0.2, abs=1e-6)
    assert x_prev.item() == pytest.approx(mean.item())
    assert log_prob.item() == pytest.approx(-math.log(0.35) - 0.5 * math.log(2 * math.pi), abs=1e-6)
    # at s = 1 the next sigma stands in the denominator: std_s = 0.7 sqrt(1 / (1 - 0.9))
    _, _, _, std = flow_sde_step(v, x, 1.0, 0.9, 0.9, 0.7, noise=torch.zeros(1, 1))
    assert std == pytest.approx(0.7 * math.sqrt(10) * math.sqrt(0.1))


def test_the_noise_level_is_refused_outside_0_to_1_saying_why():
    from optim.generators.kernels import MAX_NOISE_LEVEL, check_noise_level, flow_sde_std

    assert check_noise_level(1) == 1.0 and check_noise_level(0.7) == 0.7
    for bad in (0.0, -0.1, 1.01, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"noise_level must be in \(0, 1\], got .*: 0 is the ODE, which has no "
                                             r"log-probability, and above 1 the SDE's first step adds more noise"):
            check_noise_level(bad)
    # why 1: the first step's std is a whatever the schedule (s1 cancels), so at 1 it adds the initial latent's noise
    for s1 in (0.9, 0.964):
        assert flow_sde_std(1.0, s1, s1, MAX_NOISE_LEVEL)[1] == pytest.approx(1.0)


def test_flow_sde_step_scores_its_own_draws_and_tends_to_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from optim.generators.kernels import flow_sde_step

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas
    generator = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    for j in (0, 4, 9):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        drawn, log_prob, _, _ = flow_sde_step(v, x, s, s_next, float(sigmas[1]), 0.7, noise=z)
        assert torch.equal(flow_sde_step(v, x, s, s_next, float(sigmas[1]), 0.7, prev_sample=drawn)[1], log_prob)
        _, _, mean, _ = flow_sde_step(v, x, s, s_next, float(sigmas[1]), 1e-4, noise=z)  # almost no noise: the ODE
        scheduler._step_index = j
        euler = scheduler.step(v, scheduler.timesteps[j], x).prev_sample
        assert torch.allclose(mean, euler, atol=1e-4), f"step {j}"


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_bf16_sampling_keeps_the_ratio_at_one_and_an_update_runs_checkpointed_in_micro_batches(folders, family, tmp_path):
    policy = Policy.load(folders[family], dtype="bf16")
    assert policy.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in policy.lora_parameters())
    trajectory = policy.sample(PROMPT, n=3, seed=6, **FAST).trajectory
    assert trajectory.latents.dtype == torch.float32 and torch.isfinite(trajectory.log_probs).all()
    assert torch.equal(policy.log_probs(trajectory), trajectory.log_probs)
    policy.gradient_checkpointing = True  # as on a GPU
    store = VersionStore(tmp_path / "versions")
    policy.open_versions(store)
    for algorithm in ("grpo", "dpo"):
        config = UpdateConfig(algorithm=algorithm, epochs=1, micro_batch=2, kl_budget=float("inf"), seed=0,
                              dpo=DPOConfig(noise_draws=1))
        result = apply_update(policy, store, [ranked(trajectory)], config)
        assert result.applied and math.isfinite(result.metrics["loss_last"]), result.message
    assert not policy.denoiser.is_gradient_checkpointing  # switched off again after the update


def test_an_sd3_folder_without_its_t5_encoder_loads_and_samples(tmp_path):
    from tests.family_models import TINY

    folder = build("sd3", tmp_path / "sd3-no-t5", spec=dict(TINY["sd3"], t5=None))
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    policy = Policy.load(folder)
    assert policy.pipeline.text_encoder_3 is None
    trajectory = policy.sample(PROMPT, n=2, seed=0, **FAST).trajectory  # T5's part of the embeddings is zeros, as diffusers'
    assert torch.equal(policy.log_probs(trajectory), trajectory.log_probs)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_offline_dpo_training_runs_on_the_family(folders, family, tmp_path):
    from safetensors.torch import load_file

    from optim.train import TrainConfig, train
    from tests.test_train import adapters_moved, phantom_pair, write_pick_a_pic

    rows = [(*phantom_pair("CT", 1), 1.0, 0.0), (*phantom_pair("MRI", 2), 0.0, 1.0)]
    data = write_pick_a_pic(tmp_path / "pairs.parquet", rows, as_datasets_image=True)
    run = train(TrainConfig(model=str(folders[family]), data=str(data), out=str(tmp_path / "checkpoints"), batch_size=2,
                            report_to="none", dpo=DPOConfig(noise_draws=1)))
    meta = json.loads((run / "epoch_1" / "meta.json").read_text())
    assert math.isfinite(meta["metrics"]["loss"]) and meta["base_model"] == str(folders[family].resolve())
    assert adapters_moved(load_file(run / "epoch_1" / "adapter.safetensors"))


def test_the_noise_level_is_a_flow_models_setting_recorded_with_its_chains(folders):
    policy = Policy.load(folders["sd3"], noise_level=0.3)
    trajectory = policy.sample(PROMPT, n=2, seed=0, steps=STEPS, guidance=3.0, eta=0.5).trajectory
    assert trajectory.noise_level == pytest.approx(0.15)  # eta scales it
    policy.noise_level = 0.9  # a later change of the setting does not change how stored chains are scored
    assert torch.equal(policy.log_probs(trajectory), trajectory.log_probs)
    with pytest.raises(ModelLoadError, match=r"holds a Stable Diffusion XL model, which takes no noise_level setting "
                                             r"\(--noise-level\): only Stable Diffusion 3 / 3.5 and FLUX.1 models do"):
        Policy.load(folders["sdxl"], noise_level=0.3)
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"noise_level must be in \(0, 1\]"):
            Policy.load(folders["flux"], noise_level=bad)


def test_a_flux_schnell_folder_without_guidance_embedding_samples_unguided(tmp_path):
    from tests.family_models import TINY

    spec = dict(TINY["flux"], transformer=dict(TINY["flux"]["transformer"], guidance_embeds=False))
    policy = Policy.load(build("flux", tmp_path / "schnell", spec=spec))
    assert not policy.transformer.config.guidance_embeds
    trajectory = policy.sample(PROMPT, n=2, seed=0, **FAST).trajectory
    assert torch.isfinite(trajectory.log_probs).all() and torch.equal(policy.log_probs(trajectory), trajectory.log_probs)
