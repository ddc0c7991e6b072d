"""Versions that travel: a version exported as a diffusers LoRA file loads into a plain diffusers pipeline
with ``load_lora_weights`` and gives the workbench policy's UNet output; a diffusers LoRA file starts a policy."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from optim.policy import DEFAULT_MODEL, ModelLoadError, Policy
from optim.versions import VersionStore


def plain_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=generator), torch.tensor(500), torch.randn(2, 32, 64, generator=generator)


@torch.no_grad()
def plain_output(pipeline):
    latents, timestep, embeds = unet_inputs()
    return pipeline.unet(latents, timestep, embeds).sample


@torch.no_grad()
def policy_output(policy):
    return policy.predict(*unet_inputs())


def trained_version(policy, store):
    """A version whose adapters are not zero: random B matrices stand in for an update."""
    generator = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=generator) * 0.05 if "lora_B" in k else v
               for k, v in policy.lora_state_dict().items()}
    policy.load_lora_state_dict(weights)
    return policy.save_version(store, algorithm="grpo")


def test_an_exported_version_loads_in_a_plain_pipeline_and_gives_the_policys_output(tmp_path):
    policy = Policy.load()
    store = VersionStore(tmp_path / "versions")
    policy.open_versions(store)
    trained = trained_version(policy, store)
    expected = policy_output(policy)
    policy.use_version(store, "v0")  # the export reads the store, not the live adapters

    path = store.export_diffusers_lora(trained.id, tmp_path / "v1.safetensors", policy.adapter_config())
    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert len(keys) == len(policy.lora_parameters())
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 4

    pipeline = plain_pipeline()
    base = plain_output(pipeline)
    pipeline.load_lora_weights(str(path))
    loaded = plain_output(pipeline)
    assert torch.allclose(loaded, expected, atol=1e-5, rtol=0)
    assert (loaded - base).abs().max() > 1e-2  # the LoRA loaded: not the base model in disguise
    assert not list(tmp_path.glob(".v1.safetensors.*"))  # no staging folder left behind


def test_an_export_refuses_a_name_diffusers_would_not_read_and_an_unknown_version(tmp_path, policy):
    store = VersionStore(tmp_path / "versions")
    with pytest.raises(ValueError, match="ends in .safetensors, got v0.bin"):
        store.export_diffusers_lora("v0", tmp_path / "v0.bin", policy.adapter_config())
    with pytest.raises(KeyError, match="unknown version 'v7'"):
        store.export_diffusers_lora("v7", tmp_path / "v7.safetensors", policy.adapter_config())


@pytest.fixture(scope="module")
def outside_lora(tmp_path_factory):
    """A LoRA trained elsewhere: rank 4, alpha 8 (scaling 2), on more layers than the workbench adapts."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("outside")
    pipeline = plain_pipeline()
    config = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in"])
    pipeline.unet.add_adapter(LoraConfig(**config, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(2)
    for name, parameter in pipeline.unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    pipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
                               weight_name="outside.safetensors", unet_lora_adapter_metadata=config)
    return folder / "outside.safetensors", plain_output(pipeline)


def test_a_policy_starts_from_a_diffusers_lora_and_its_first_version_travels_back(tmp_path, outside_lora):
    path, outside = outside_lora
    policy = Policy.load(lora=path)
    assert policy.adapter_config() == {"r": 4, "lora_alpha": 8, "target_modules": ["proj_in", "to_q", "to_v"]}
    assert torch.allclose(policy_output(policy), outside, atol=1e-5, rtol=0)
    with policy.reference():  # the reference policy stays the base model
        assert not torch.allclose(policy_output(policy), outside, atol=1e-3)
    store = VersionStore(tmp_path / "versions")
    first = policy.open_versions(store)
    assert first.metrics["initial_lora"]["file"] == str(path.resolve())
    exported = store.export_diffusers_lora(first.id, tmp_path / "v0.safetensors", policy.adapter_config())
    pipeline = plain_pipeline()
    pipeline.load_lora_weights(str(exported))
    assert torch.allclose(plain_output(pipeline), outside, atol=1e-5, rtol=0)

    # the store's versions fit only adapters shaped like its first: another start is refused with a hint
    with pytest.raises(ModelLoadError, match=r"start from the LoRA file .*outside.safetensors, but this model starts "
                                             r"from the base model \(no LoRA file\): start with --lora"):
        Policy.load().open_versions(store)


def test_a_half_precision_policy_keeps_the_files_exact_fp32_adapters(outside_lora):
    path, _ = outside_lora
    policy = Policy.load(dtype="bf16", lora=path)
    with safe_open(path, "pt") as f:
        original = {k[len("unet."):]: f.get_tensor(k) for k in f.keys()}
    weights = policy.lora_state_dict()
    assert weights.keys() == original.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, original[k]) for k, v in weights.items())
    assert all(p.dtype == torch.float32 for p in policy.lora_parameters())


def test_lora_files_the_workbench_cannot_train_are_refused_with_reasons(tmp_path, outside_lora):
    with pytest.raises(ModelLoadError, match="LoRA file not found"):
        Policy.load(lora=tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00")  # not safetensors (a pickle or a file cut short reads the same)
    with pytest.raises(ModelLoadError, match="could not read the LoRA file .*cut.safetensors"):
        Policy.load(lora=cut)
    path, _ = outside_lora
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    both = tmp_path / "both.safetensors"
    save_file(tensors, both)
    with pytest.raises(ModelLoadError, match="also adapts text_encoder: the workbench trains the UNet's adapters only"):
        Policy.load(lora=both)


def test_a_room_started_from_a_lora_hands_its_versions_out_over_http(tmp_path, outside_lora):
    """``app.py --lora FILE``: the room's first version is base + that LoRA, and ``/version_lora`` hands any
    version back as a file diffusers loads."""
    from gradio_client import Client

    from workbench.api import RoomAPI
    from workbench.room import ControlRoom
    from workbench.ui import serve

    path, outside = outside_lora
    room = ControlRoom(workdir=tmp_path / "run", lora=path, dtype="fp32")
    assert room.policy.dtype == torch.float32 and room.versions()[0]["metrics"]["initial_lora"]["file"] == str(path.resolve())
    page = serve(RoomAPI(room), block=False)
    try:
        local = Client(page.local_url, verbose=False)
        handed = local.predict(version_id="v0", api_name="/version_lora")
        with pytest.raises(Exception, match="unknown version 'v9'; known versions: v0"):
            local.predict(version_id="v9", api_name="/version_lora")
    finally:
        page.close()
    assert handed.endswith("generator-v0-lora.safetensors")
    pipeline = plain_pipeline()
    pipeline.load_lora_weights(handed)
    assert torch.allclose(plain_output(pipeline), outside, atol=1e-5, rtol=0)


def test_app_refuses_a_missing_lora_file_in_one_line(tmp_path, capsys, monkeypatch):
    import app
    from app import main

    monkeypatch.setattr(app, "port_problem", lambda host, port: None)  # another test's page may hold the port
    assert main(["--workdir", str(tmp_path), "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"error: LoRA file not found: {tmp_path / 'nope.safetensors'}"
