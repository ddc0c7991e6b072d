"""fp16: the loss is scaled so that small gradients do not underflow in fp16 activations on their way to
the fp32 adapters; bf16 and fp32 need no scale."""

import pytest
import torch

from optim.preference.groups import RankedGroup
from optim.policy import Policy
from optim.preference.update import FP16_LOSS_SCALE, LossScale, UpdateConfig, apply_update, grpo_backward
from optim.versions import VersionStore
from tests.conftest import PROMPT

TINY = dict(steps=4, guidance=5.0, eta=1.0)
IDS = ["c0", "c1", "c2", "c3"]


def test_the_loss_scale_recomputes_an_overflowed_step_at_half_the_scale_and_unscales():
    parameter = torch.nn.Parameter(torch.zeros(2))
    seen = []

    def run(scale):  # a scaled gradient overflows above 2^10
        seen.append(scale)
        parameter.grad = torch.full((2,), float("inf")) if scale > 2**10 else torch.tensor([0.5, -0.25]) * scale
        return {"scale": scale}

    scale = LossScale(torch.float16)
    assert scale.value == FP16_LOSS_SCALE == 2**16
    assert scale.backward(run, [parameter]) == {"scale": 2**10}
    assert seen == [2.0**k for k in range(16, 9, -1)] and scale.value == 2**10
    assert parameter.grad.tolist() == [0.5, -0.25]  # unscaled
    for dtype in (torch.bfloat16, torch.float32):
        assert LossScale(dtype).value == 1.0


@pytest.fixture(scope="module")
def fp16_policy():
    return Policy.load(dtype="fp16")


@pytest.fixture()
def moved(policy, fp16_policy):
    """The fp32 and fp16 policies with the same adapter weights, moved off zero (so every LoRA matrix gets a gradient)."""
    start = policy.lora_state_dict()
    generator = torch.Generator().manual_seed(0)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in start.items()}
    for model in (policy, fp16_policy):
        model.load_lora_state_dict(weights)
    yield policy, fp16_policy
    for model in (policy, fp16_policy):
        model.load_lora_state_dict(start)
        model.version = None


def gradients(model, group, loss_scale):
    for p in model.lora_parameters():
        p.grad = None
    grpo_backward(model, [group], UpdateConfig(), [[2]], loss_scale=loss_scale)
    return torch.cat([p.grad.flatten() / loss_scale for p in model.lora_parameters()])


def test_fp16_gradients_match_fp32_with_the_loss_scale_and_underflow_without(moved):
    """The embedded model's latent has 1024 elements, a 768 px one 36864: its log-probabilities (means over the
    elements) give gradients 36 times smaller, which a loss 36 times smaller reproduces here."""
    policy, fp16_policy = moved
    trajectory = policy.sample(PROMPT, n=4, seed=1, **TINY).trajectory
    group = RankedGroup("g", IDS, trajectory, [([["c2"], ["c0", "c3"], ["c1"]], 2)])
    exact = gradients(policy, group, 1 / 36)

    def error(grads):  # the median entry's relative error: underflow wipes out the small entries, not the norm
        return float(((grads - exact).abs() / exact.abs()).median())

    scaled, unscaled = gradients(fp16_policy, group, FP16_LOSS_SCALE / 36), gradients(fp16_policy, group, 1 / 36)
    # measured 0.046: fp16's rounding, as bf16's; with the scale 1 entry in 41216 came out 0 (its exact value
    # -8.6e-8, a sum that cancels, about 100 times below the typical entry), without it 5%
    assert (scaled == 0).float().mean() < 1e-3 and error(scaled) < 0.08
    assert (unscaled == 0).float().mean() > 0.02 and error(unscaled) > 2 * error(scaled)  # measured 5% zeros, 0.21


def test_an_fp16_update_records_its_loss_scale_and_an_fp32_one_none(moved, tmp_path):
    for model, expected in zip(moved, (1.0, FP16_LOSS_SCALE)):
        trajectory = model.sample(PROMPT, n=4, seed=1, **TINY).trajectory
        group = RankedGroup("g", IDS, trajectory, [([["c2"], ["c0", "c3"], ["c1"]], 2)])
        result = apply_update(model, VersionStore(tmp_path / str(expected)), [group],
                              UpdateConfig(epochs=1, train_fraction=0.25, kl_budget=float("inf"), seed=0))
        assert result.applied and result.metrics["steps"][0]["loss_scale"] == expected


def test_offline_training_refuses_fp16_without_accelerates_loss_scaler(tmp_path):
    from accelerate.state import AcceleratorState

    from optim.train import TrainConfig, Trainer

    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(ValueError, match="an fp16 model needs a loss scale"):
            Trainer(TrainConfig(algorithm="grpo", prompts="unused.txt", out=str(tmp_path), report_to="none", dtype="fp16"))
    finally:
        AcceleratorState._reset_state(True)


def test_a_dpo_step_recomputed_at_a_lower_loss_scale_keeps_its_timesteps_and_noise(moved, tmp_path, monkeypatch):
    """An overflow retry must redo the same step: the same pairs' (t, noise), not a fresh draw."""
    import optim.preference.dpo

    draws = []
    original_draw = optim.preference.dpo.NoiseDraws.draw

    def recording_draw(*args, **kwargs):
        draws.append(original_draw(*args, **kwargs))
        return draws[-1]

    def overflow_once(self, run, parameters):  # as LossScale.backward does after one overflow
        run(self.value)
        for p in parameters:
            p.grad = None
        self.value /= 2
        return run(self.value)

    monkeypatch.setattr(optim.preference.dpo.NoiseDraws, "draw", staticmethod(recording_draw))
    monkeypatch.setattr(LossScale, "backward", overflow_once)
    model = moved[0]
    trajectory = model.sample(PROMPT, n=4, seed=1, **TINY).trajectory
    group = RankedGroup("g", IDS, trajectory, [([["c2"], ["c0", "c3"], ["c1"]], 2)])
    result = apply_update(model, VersionStore(tmp_path / "v"), [group],
                          UpdateConfig(algorithm="dpo", epochs=2, kl_budget=float("inf"), seed=0))
    assert result.applied and len(draws) == 4  # two optimizer steps, each run twice
    assert torch.equal(draws[0].noise, draws[1].noise) and torch.equal(draws[0].timesteps, draws[1].timesteps)
    assert not torch.equal(draws[1].noise, draws[2].noise)  # the next optimizer step draws afresh
