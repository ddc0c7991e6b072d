"""The version store: atomic saves, a current pointer, rollback, clear errors."""

import pytest
import torch

import optim.versions as versions
from optim.versions import VersionStore


def weights(value):
    return {"lora_A": torch.full((2, 2), float(value))}


def test_save_list_and_rollback(tmp_path):
    store = VersionStore(tmp_path)
    v0 = store.save(weights(0), parent=None, algorithm=None, base_model="m")
    v1 = store.save(weights(1), parent="v0", algorithm="dpo", base_model="m", metrics={"loss": 0.6})
    assert [v.id for v in store.list()] == ["v0", "v1"] and store.current == "v1"
    assert store.weights("v1")["lora_A"][0, 0] == 1.0
    store.set_current(v0.id)
    assert store.current == "v0"
    assert VersionStore(tmp_path).current == "v0"  # the pointer survives a restart
    assert v1.metrics == {"loss": 0.6}


def test_crash_while_saving_leaves_the_last_good_version_current(tmp_path, monkeypatch):
    store = VersionStore(tmp_path)
    store.save(weights(0), parent=None, algorithm=None, base_model="m")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(versions, "save_file", disk_full)
    with pytest.raises(OSError):
        store.save(weights(1), parent="v0", algorithm="grpo", base_model="m")
    assert [v.id for v in store.list()] == ["v0"] and store.current == "v0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_unknown_version_names_the_known_ones(tmp_path):
    store = VersionStore(tmp_path)
    store.save(weights(0), parent=None, algorithm=None, base_model="m")
    with pytest.raises(KeyError, match="unknown version 'v7'; known versions: v0"):
        store.set_current("v7")
    with pytest.raises(KeyError, match="unknown version '../etc'"):
        store.weights("../etc")


def test_kill_leftovers_staging_folders_removed_and_a_version_set_aside(tmp_path):
    store = VersionStore(tmp_path)
    store.save(weights(0), parent=None, algorithm=None, base_model="m")
    store.save(weights(1), parent="v0", algorithm="grpo", base_model="m")
    half_written = tmp_path / ".staging-abc123"
    half_written.mkdir()
    (half_written / "adapter.safetensors").write_bytes(b"half")
    assert store.remove_staging() == [half_written] and not half_written.exists()

    with pytest.raises(ValueError, match="version v1 is current: roll back first"):
        store.set_aside("v1")
    store.set_current("v0")
    moved = store.set_aside("v1")
    assert moved.parent == tmp_path and moved.name.startswith(".set-aside-v1-") and (moved / "meta.json").exists()
    assert [v.id for v in store.list()] == ["v0"]
    assert store.save(weights(2), parent="v0", algorithm="dpo", base_model="m").id == "v1"  # the number is free again
