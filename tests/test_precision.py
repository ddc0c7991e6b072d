"""Precision and memory: frozen networks in bf16/fp16/fp32, fp32 adapters and log-probabilities,
gradient checkpointing during updates, the VAE decoding in chunks."""

import json

import numpy as np
import pytest
import torch

from optim.preference.grpo import GRPOConfig, grpo_step
from optim.policy import DECODE_CHUNK, Policy, main, resolve_dtype
from tests.conftest import PROMPT

TINY = dict(steps=2, guidance=5.0, eta=1.0)  # bf16 and fp16 are slow on this CPU: two steps show the casts


@pytest.fixture(scope="module")
def half_policies():
    """One policy per half precision, loaded once: bf16 and fp16 both run on the CPU (slowly)."""
    return {name: Policy.load(dtype=name) for name in ("bf16", "fp16")}


def policy_in(name, policy, half_policies):
    return policy if name == "fp32" else half_policies[name]


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_ratio_is_exactly_one_in_every_dtype(name, dtype, policy, half_policies):
    model = policy_in(name, policy, half_policies)
    assert model.dtype == dtype
    frozen = [model.vae, model.text_encoder]
    assert all(p.dtype == dtype for module in frozen for p in module.parameters())
    assert all(p.dtype == dtype for n, p in model.unet.named_parameters() if "lora_" not in n)
    assert model.lora_parameters() and all(p.dtype == torch.float32 for p in model.lora_parameters())
    trajectory = model.sample(PROMPT, n=1, seed=3, **TINY).trajectory
    for tensor in (trajectory.latents, trajectory.log_probs, trajectory.prompt_embeds, trajectory.negative_embeds):
        assert tensor.dtype == torch.float32
    assert torch.isfinite(trajectory.log_probs).all()
    assert torch.equal(model.log_probs(trajectory), trajectory.log_probs)  # bit for bit: the ratio is exactly 1
    # the same seed draws nearly the same chain as in fp32: the casts lose precision, not the model
    exact = policy.sample(PROMPT, n=1, seed=3, **TINY).trajectory.latents[:, -1]
    assert (trajectory.latents[:, -1] - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_grpo_backward_in_bf16_gives_fp32_gradients_to_the_adapters(half_policies):
    model = half_policies["bf16"]
    lora_A = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.lora_A["default"]
    seen = []
    hook = lora_A.register_forward_hook(lambda module, args, output: seen.append((args[0].dtype, output.dtype)))
    try:
        trajectory = model.sample(PROMPT, n=2, seed=5, steps=1).trajectory
        terms = grpo_step(model, trajectory, 0, torch.tensor([1.0, -1.0]), GRPOConfig())
    finally:
        hook.remove()
    # the adapter's arithmetic runs in bf16 (no fp32 copy of the activations), its weights stay fp32
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)} and lora_A.weight.dtype == torch.float32
    assert torch.equal(terms.ratio, torch.ones(2))
    parameters = model.lora_parameters()
    grads = torch.autograd.grad(terms.loss, parameters)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    moved = [name for (name, _), g in zip(lora_named(model), grads) if g.abs().sum() > 0]
    # B starts at zero, so only B has a gradient at first; every adapted layer's B gets one
    assert moved and all(".lora_B." in name for name in moved) and len(moved) == len(parameters) // 2


def lora_named(model):
    return [(n, p) for n, p in model.unet.named_parameters() if "lora_" in n]


def test_default_dtype_is_half_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp16, fp32, got 'half'"):
        resolve_dtype("half", torch.device("cpu"))


def block_calls(policy):
    """Counts the forward runs of one transformer block (a checkpointed block runs again in backward)."""
    calls = []
    block = policy.unet.down_blocks[1].attentions[0].transformer_blocks[0]
    return calls, block.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_gradient_checkpointing_recomputes_in_backward_and_gives_the_same_gradients(policy, monkeypatch):
    trajectory = policy.sample(PROMPT, n=2, seed=6, **TINY).trajectory
    parameters = policy.lora_parameters()

    def gradients():
        log_prob, _, _ = policy.score_step(trajectory, 0)
        return torch.autograd.grad(-log_prob.mean(), parameters)

    calls, hook = block_calls(policy)
    try:
        plain = gradients()
        assert len(calls) == 1
        monkeypatch.setattr(policy, "gradient_checkpointing", True)
        calls.clear()
        with policy.training():
            assert policy.unet.is_gradient_checkpointing and not policy.unet.training  # eval semantics kept
            checkpointed = gradients()
            assert len(calls) == 2  # forward, then again in backward
            calls.clear()
            with torch.no_grad():
                policy.score_step(trajectory, 0)
            assert len(calls) == 1  # passes without gradients (reference, trust region) are not checkpointed
        assert not policy.unet.is_gradient_checkpointing
    finally:
        hook.remove()
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_is_off_by_default_on_the_cpu(policy):
    assert policy.gradient_checkpointing is False
    with policy.training():
        assert not policy.unet.is_gradient_checkpointing


def test_decoding_runs_in_chunks_and_matches_one_call(policy):
    latents = torch.randn(DECODE_CHUNK + 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    batches = []
    hook = policy.vae.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        chunked = policy.decode(latents)
    finally:
        hook.remove()
    assert batches == [DECODE_CHUNK, 2] and len(chunked) == DECODE_CHUNK + 2
    with torch.no_grad():
        whole = policy.vae.decode(latents / policy.vae.config.scaling_factor).sample
    whole = policy.pipeline.image_processor.postprocess(whole, output_type="pil")
    difference = np.abs(np.stack([np.asarray(a, np.int16) - np.asarray(b, np.int16) for a, b in zip(chunked, whole)]))
    assert difference.max() <= 1


def test_cli_samples_in_the_dtype_asked_for(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", "--prompt", PROMPT, "-n", "1", "--steps", "1", "--out", str(out), "--dtype", "bf16"]) == 0
    assert json.loads((out / "samples.json").read_text())["dtype"] == "bf16"
    with pytest.raises(SystemExit):
        main(["sample", "--prompt", PROMPT, "--out", str(out), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in a process-wide singleton: reset it around a test that changes the precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("asked,dtype", [(None, torch.bfloat16), ("fp32", torch.float32)])
def test_offline_grpo_under_mixed_precision_samples_and_scores_in_the_same_precision(asked, dtype, tmp_path, monkeypatch,
                                                                                        fresh_accelerate_state):
    """``accelerate launch --mixed_precision bf16``: the policy loads in bf16 (or the ``--dtype`` asked for) and the
    wrapped loss runs without autocast, so a fresh group scored through the DDP-ready module has ratio exactly 1.
    (Before: an fp32 policy sampled outside autocast and scored inside it, ratio 0.75 on this model.)"""
    from optim.train import TrainConfig, Trainer, parse_args

    assert parse_args(["--algorithm", "grpo", "--prompts", "p.txt", "--dtype", "fp16"]).dtype == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = Trainer(TrainConfig(algorithm="grpo", prompts="unused.txt", out=str(tmp_path), report_to="none", dtype=asked))
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.policy.dtype == dtype
    trajectory = trainer.policy.sample(PROMPT, n=1, seed=7, **TINY).trajectory
    with torch.no_grad():
        for step in range(TINY["steps"]):
            terms = trainer.model(grpo_step, trajectory, step, torch.tensor([1.0]), GRPOConfig())
            assert torch.equal(terms.ratio, torch.ones(1))
    trainer.accelerator.end_training()
