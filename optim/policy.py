"""The generator as a policy: ``Policy.load(path)`` loads any supported family (``optim.generators``).

``Policy`` is ``optim.generators.Generator``, the interface every family meets: ``sample`` draws a group
of candidates in ONE batched run and records their trajectories (latents, timesteps, each step's
log-probability, the prompt's conditioning); ``log_probs`` / ``score_step`` re-score a stored
trajectory under the current weights (with unchanged weights the ratio is exactly 1); ``reference()``
is the same network with its LoRA adapters disabled; versions are adapter weights in a ``VersionStore``.
The families live one per file in ``optim/generators/`` (Stable Diffusion 1.x/2.x, SDXL, SD 3 / 3.5,
FLUX); the family comes from the folder's ``model_index.json``.

Each candidate has its own seed (drawn from the group seed), and its own random generator for the
initial latent and every step's noise, so one candidate can be re-drawn alone with ``seeds=[s]``.

Precision (``dtype``): the frozen networks run in bf16, fp16 or fp32; the LoRA weights and everything
computed from a network's output stay fp32 (see ``optim.generators.base``).

Command line::

    python -m optim.policy sample --prompt "OCT: retinal layers with subretinal fluid" -n 4 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from optim.generators import FAMILIES, family_for, load_generator  # noqa: F401
from optim.generators.base import (  # noqa: F401
    DECODE_CHUNK, DEFAULT_MODEL, DTYPES, MAX_CANDIDATES, Generator, ModelLoadError, Samples, candidate_seeds, dtype_name,
    resolve_dtype,
)
from optim.versions import UnknownVersion, VersionStore

Policy = Generator  # the name the README, the room and the tests use


# ---------------------------------------------------------------------- command line


def _sample_command(args) -> None:
    out, versions = Path(args.out), Path(args.workdir) / "versions"
    if out.exists() and not out.is_dir():  # found before the model loads and samples, not after
        raise ValueError(f"--out {out} is a file; the candidates are written into a folder")
    if args.version and not versions.is_dir():  # and no empty version store left behind in a wrong --workdir
        raise ValueError(f"--version {args.version}: {args.workdir} holds no versions (no {versions} folder)")
    options = {} if args.noise_level is None else {"noise_level": args.noise_level}
    policy = Policy.load(args.model, dtype=args.dtype, lora=args.lora, **options)
    if args.version:
        policy.use_version(VersionStore(versions), args.version)
    result = policy.sample(args.prompt, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance, eta=args.eta)
    out.mkdir(parents=True, exist_ok=True)
    trajectory = result.trajectory
    candidates = []
    for i, (image, seed) in enumerate(zip(result.images, trajectory.seeds)):
        name = f"candidate_{i}.png"
        image.save(out / name)
        candidates.append({"index": i, "file": name, "seed": seed, "log_probs": trajectory.log_probs[i].tolist()})
    record = {
        "prompt": args.prompt,
        "model": str(policy.model_path),
        "version": policy.version or "base",
        "dtype": dtype_name(policy.dtype),
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        "group_seed": args.seed,
        "timesteps": trajectory.timesteps.tolist(),
        "candidates": candidates,
    }
    (out / "samples.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(candidates)} candidates and samples.json to {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optim.policy", description="Sample from the generator.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="draw candidates, write PNGs and samples.json")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("-n", type=int, default=4, help="number of candidates (default 4)")
    sample.add_argument("--seed", type=int, default=0, help="group seed; candidate seeds derive from it")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--model", default=None, help="local diffusers folder (default: the embedded model)")
    sample.add_argument("--version", default=None, help="LoRA version id from --workdir, e.g. v3")
    sample.add_argument("--workdir", default="runs/demo", help="work directory holding versions/ (default runs/demo)")
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--guidance", type=float, default=5.0)
    sample.add_argument("--eta", type=float, default=1.0)
    sample.add_argument("--lora", default=None, help="diffusers LoRA file the adapters start from (as app.py --lora)")
    sample.add_argument("--noise-level", type=float, default=None,
                        help="SD 3 / FLUX only: the Flow-GRPO SDE's noise level (default 0.7)")
    sample.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="frozen networks' precision (default: bf16 or fp16 on a GPU, fp32 on the CPU)")
    args = parser.parse_args(argv)
    try:
        _sample_command(args)
    except (ModelLoadError, ValueError, UnknownVersion, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
