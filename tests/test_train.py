"""Offline training (optim/train.py): Pick-a-Pic data with ties, DPO checkpoints, two stages, GRPO with
AI feedback, and a real two-process run whose replicas must end with identical weights."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.phantoms import make_phantom
from optim.preference.dpo import DPOConfig
from optim.train import PickAPicPairs, TrainConfig, lora_digest, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
FAST_DPO = DPOConfig(noise_draws=1)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def phantom_pair(modality: str, seed: int) -> tuple[str, bytes, bytes]:
    first, second = make_phantom(modality, seed), make_phantom(modality, seed + 100)
    return first.prompt, png(first.image), png(second.image)


def write_pick_a_pic(path: Path, rows: list[tuple], as_datasets_image: bool = False) -> Path:
    """rows: (caption, jpg_0 bytes, jpg_1 bytes, label_0, label_1). With ``as_datasets_image`` the images
    are written by Hugging Face datasets, as ``datasets.Image`` {bytes, path} structs."""
    caption, jpg_0, jpg_1, label_0, label_1 = (list(column) for column in zip(*rows))
    columns = {"caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0, "label_1": label_1}
    if as_datasets_image:
        import datasets

        features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
                                      "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64")})
        images = {k: [{"bytes": b, "path": None} for b in columns[k]] for k in ("jpg_0", "jpg_1")}
        datasets.Dataset.from_dict({**columns, **images}, features=features).to_parquet(str(path))
    else:
        pq.write_table(pa.table(columns), path)
    return path


def adapters_moved(weights: dict[str, torch.Tensor]) -> bool:
    """The LoRA starts with every B at zero; a trained adapter has some B away from zero."""
    return any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def test_pick_a_pic_pairs_drop_ties_and_follow_the_labels(tmp_path):
    a, b = make_phantom("CT", 1), make_phantom("CT", 2)
    path = write_pick_a_pic(tmp_path / "pairs.parquet", [
        ("CT: one", png(a.image), png(b.image), 1.0, 0.0),
        ("CT: tie", png(a.image), png(b.image), 0.5, 0.5),
        ("CT: two", png(a.image), png(b.image), 0.0, 1.0),
    ], as_datasets_image=True)
    pairs = PickAPicPairs(path)
    assert (len(pairs), pairs.ties) == (2, 1)
    (w0, l0, c0, weight0), (w1, l1, c1, weight1) = pairs[0], pairs[1]
    assert (c0, c1) == ("CT: one", "CT: two") and (weight0, weight1) == (1.0, 1.0)  # no expert_level column
    same = lambda x, y: np.array_equal(np.asarray(x), np.asarray(y))  # noqa: E731
    assert same(w0, l1) and same(w1, l0)  # the label_1 row: its jpg_1 wins
    levelled = pa.table({"caption": ["CT: one", "CT: two"], "jpg_0": [png(a.image)] * 2, "jpg_1": [png(b.image)] * 2,
                         "label_0": [1.0, 0.0], "label_1": [0.0, 1.0], "expert_level": [3, 1]})
    pq.write_table(levelled, tmp_path / "levelled.parquet")  # the workbench's own export carries the level
    assert [pair[3] for pair in PickAPicPairs(tmp_path / "levelled.parquet")] == [3.0, 1.0]
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="not in Pick-a-Pic format"):
        PickAPicPairs(tmp_path / "bad.parquet")


def test_command_line_options_fill_the_config():
    config = parse_args(["--data", "p.parquet", "--beta", "2500", "--loss-type", "hinge", "--two-stage", "--batch-size", "2",
                         "--step-weighting", "noise"])
    chosen = (config.data, config.dpo.beta, config.dpo.loss_type, config.two_stage, config.batch_size, config.grpo.step_weighting)
    assert chosen == ("p.parquet", 2500, "hinge", True, 2, "noise")
    assert parse_args(["--data", "p.parquet"]).grpo.step_weighting == "uniform"
    with pytest.raises(ValueError, match="needs --prompts"):
        train(TrainConfig(algorithm="grpo"))


def test_dpo_epoch_drops_ties_and_writes_a_loadable_checkpoint(tmp_path, capsys, policy):
    rows = [(*phantom_pair("CT", 1), 1.0, 0.0), (*phantom_pair("MRI", 2), 0.0, 1.0),
            (*phantom_pair("OCT", 3), 0.5, 0.5), (*phantom_pair("XRAY", 4), 1.0, 0.0)]
    data = write_pick_a_pic(tmp_path / "pairs.parquet", rows, as_datasets_image=True)
    run = train(TrainConfig(data=str(data), out=str(tmp_path / "checkpoints"), batch_size=2, dpo=FAST_DPO))
    assert "4 rows, 1 ties dropped, 3 pairs" in capsys.readouterr().out
    assert run.parent == tmp_path / "checkpoints" and sorted(p.name for p in run.glob("epoch_*")) == ["epoch_1"]
    meta = json.loads((run / "epoch_1" / "meta.json").read_text())
    assert (meta["epoch"], meta["stage"], meta["pairs"], meta["steps_per_process"]) == (1, 1, 3, 2)
    assert math.isfinite(meta["metrics"]["loss"]) and meta["base_model"] == str(policy.model_path)
    assert list(run.glob("optim-train/events.out.tfevents.*"))  # the tensorboard tracker logged
    weights = load_file(run / "epoch_1" / "adapter.safetensors")
    assert adapters_moved(weights) and meta["replica_digests"] == [lora_digest(weights)]
    initial = policy.lora_state_dict()
    try:
        policy.load_lora_state_dict(weights)
        assert all(torch.equal(v.cpu(), weights[k]) for k, v in policy.lora_state_dict().items())
    finally:
        policy.load_lora_state_dict(initial)


def test_two_stage_trains_again_on_the_pairs_the_selector_passes(tmp_path, capsys):
    blank = png(np.zeros((64, 64)))
    good_ct, good_mri = phantom_pair("CT", 5), phantom_pair("MRI", 6)
    rows = [(*good_ct, 1.0, 0.0), (good_ct[0], good_ct[1], blank, 1.0, 0.0), (*good_mri, 0.0, 1.0)]
    data = write_pick_a_pic(tmp_path / "pairs.parquet", rows)
    run = train(TrainConfig(data=str(data), out=str(tmp_path), two_stage=True, batch_size=2, report_to="none", dpo=FAST_DPO))
    out = capsys.readouterr().out
    assert "stage 1: 3 pairs" in out and "stage 2: 2 of 3 pairs have both images passed by the selector" in out
    stages = [json.loads((run / f"epoch_{n}" / "meta.json").read_text()) for n in (1, 2)]
    assert [(m["stage"], m["pairs"]) for m in stages] == [(1, 3), (2, 2)]


def test_grpo_with_selector_rewards_updates_the_adapters(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("CT: axial slice of the abdomen\n\n")
    run = train(TrainConfig(algorithm="grpo", prompts=str(prompts), out=str(tmp_path), group_size=2, steps=2,
                            batch_size=1, report_to="none"))
    meta = json.loads((run / "epoch_1" / "meta.json").read_text())
    assert meta["prompts"] == 1 and meta["steps_per_process"] == 1
    assert 0.0 <= meta["metrics"]["reward"] <= 1.0 and math.isfinite(meta["metrics"]["loss"])
    assert adapters_moved(load_file(run / "epoch_1" / "adapter.safetensors"))


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo")
def test_two_processes_shard_the_data_and_end_with_identical_weights(tmp_path):
    """A real ``accelerate launch`` of two CPU processes: each trains on its half of 4 pairs (2 steps, not 4)
    and reports the digest of its OWN final weights; DDP must have kept them identical."""
    rows = [(*phantom_pair(m, 10 + i), 1.0, 0.0) for i, m in enumerate(("CT", "MRI", "OCT", "XRAY"))]
    data = write_pick_a_pic(tmp_path / "pairs.parquet", rows)
    # `accelerate launch --cpu --num_processes 2` would start ONE process (accelerate wants MPI for that);
    # torchrun through --multi_gpu, told to stay on the CPU, starts two that talk over gloo.
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "optim.train", "--data", str(data),
               "--batch-size", "1", "--epochs", "1", "--report-to", "none", "--out", str(tmp_path / "out")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}  # HF_HOME: no user accelerate config applies
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (epoch,) = (tmp_path / "out").glob("*/epoch_1")
    meta = json.loads((epoch / "meta.json").read_text())
    weights = load_file(epoch / "adapter.safetensors")
    assert meta["steps_per_process"] == 2  # sharded: each process saw 2 of the 4 pairs
    assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1
    assert meta["replica_digests"][0] == lora_digest(weights) and adapters_moved(weights)
    assert "2 process(es) on cpu" in done.stdout and "all processes agree" in done.stdout


def test_ratings_csv_gives_pairs_within_each_prompt_by_level_weighted_score(tmp_path, capsys):
    from data.images import write_png
    from data.ratings import write_ratings
    from optim.train import RatingsPairs

    prompt, other = "CT: axial slice of the abdomen", "MRI: axial brain"
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        write_png(tmp_path / f"{name}.png", make_phantom("CT" if name != "d" else "MRI", seed).image)
    rows = [("a.png", 3, 3, prompt), ("b.png", 1, 1, prompt), ("b.png", 3, 1, prompt), ("c.png", 2, 2, prompt),
            ("d.png", 3, 1, other), ("../escape.png", 3, 1, prompt)]
    csv = write_ratings([{"image_path": p, "rating": r, "modality": "CT", "expert_level": lvl, "prompt": q}
                         for p, r, lvl, q in rows], tmp_path / "ratings.csv")
    pairs = RatingsPairs(csv)
    # scores: a 1.0; b (0 x 1 + 1 x 1) / 2 = 0.5; c 0.5; d alone under its prompt
    assert [(Path(w).name, Path(l).name) for w, l, _, _ in pairs.rows] == [("a.png", "b.png"), ("a.png", "c.png")]
    # weights: a's level 3 with b's mean level 1 gives 2; with c's level 2 gives 2.5
    assert [weight for *_, weight in pairs.rows] == [2.0, 2.5]
    assert pairs.ties == 1 and "row 7: image_path: outside the data root" in pairs.report
    winner, loser, caption, _ = pairs[0]
    assert caption == prompt and winner.size == (64, 64) and winner.mode == "L"
    train(TrainConfig(data=str(csv), out=str(tmp_path / "runs"), batch_size=2, report_to="none", dpo=FAST_DPO))
    assert "2 pairs within prompts, 1 ties dropped" in capsys.readouterr().out


def test_a_ratings_csv_with_no_usable_pair_says_why_before_loading_the_model(tmp_path):
    from data.ratings import write_ratings

    csv = write_ratings([{"image_path": name, "rating": 3, "modality": "CT", "expert_level": 1,
                          "prompt": "CT: axial slice of the abdomen"} for name in ("gone.png", "lost.png")],
                        tmp_path / "ratings.csv")
    with pytest.raises(ValueError, match=r"(?s)ratings.csv has no decided pair to learn from: 0 ties dropped; "
                                         r"0 rows usable, 2 rejected:.*row 2: image_path: file not found"):
        train(TrainConfig(data=str(csv), out=str(tmp_path / "runs"), report_to="none"))
    assert not (tmp_path / "runs").exists()


def test_settings_that_cannot_run_are_refused_before_the_model_loads(monkeypatch):
    with pytest.raises(ValueError, match="--lora-rank must be at least 1, got 0"):
        TrainConfig(data="pairs.parquet", lora_rank=0).check()
    with pytest.raises(ValueError, match="steps must be between 1 and 1000, got 0"):
        TrainConfig(algorithm="grpo", prompts="prompts.txt", steps=0).check()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # a machine without the tracker
    with pytest.raises(ValueError, match=r"--report-to wandb: wandb is not installed \(pip install wandb\), and the "
                                         r"run would log nothing; or pass --report-to none"):
        TrainConfig(data="pairs.parquet", report_to="wandb").check()
    TrainConfig(data="pairs.parquet", report_to="none").check()


def test_pick_a_pic_cells_that_cannot_train_name_their_row_and_column(tmp_path):
    prompt, first, second = phantom_pair("CT", 1)
    with pytest.raises(ValueError, match=r"nulls.parquet: rows 1, 2 \(counting from 0\): label_0 and label_1 must be "
                                         r"numbers"):
        PickAPicPairs(write_pick_a_pic(tmp_path / "nulls.parquet", [(prompt, first, second, 1.0, 0.0),
                                                                    (prompt, first, second, None, 0.0),
                                                                    (prompt, first, second, 1.0, float("nan"))]))
    not_parquet = tmp_path / "pairs.parquet"
    not_parquet.write_text("caption,jpg_0\n")
    with pytest.raises(ValueError, match=r"pairs.parquet is not a readable parquet file"):
        PickAPicPairs(not_parquet)
    pairs = PickAPicPairs(write_pick_a_pic(tmp_path / "bad-image.parquet", [(prompt, first, b"not a png", 0.0, 1.0)]))
    with pytest.raises(ValueError, match=r"bad-image.parquet row 0 \(counting from 0\), jpg_1: not an image"):
        pairs[0]
