"""How much of a GRPO update's gradient each denoising step carries, with its steps weighed evenly or by their std.

A step's log-probability gradient carries ``1 / std`` of its kernel, so under equal weights the last
steps, whose kernels are narrowest, can dominate the gradient though their noise decides little of the
image (``optim.preference.grpo.step_weigher``). This draws groups of the room's default candidates on the
embedded model, has a simulated expert rank them, and prints, for each group and each scored step, the
norm of the adapters' gradient when GRPO trains that step alone, as it adds to an update that trains
every step: under ``step_weighting="uniform"`` (the default) each step weighs the same, under ``"noise"``
its std over the mean std of the chain's steps (the gradient scales with the weight, so that column is
the first times the ratio).

    python tests/benchmarks/bench_step_gradients.py [--expert contrast] [--groups 8]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.phantoms import all_prompts  # noqa: E402
from data.simulated_experts import EXPERTS  # noqa: E402
from optim.preference.groups import RankedGroup  # noqa: E402
from optim.preference.update import UpdateConfig, grpo_backward  # noqa: E402
from workbench.room import ControlRoom, RoomConfig  # noqa: E402


def step_gradient_norms(policy, group: RankedGroup, config: UpdateConfig) -> list[float]:
    """The adapters' gradient norm when GRPO trains each scored step of the group alone."""
    parameters, norms = policy.lora_parameters(), []
    for step in group.trajectory.scored_steps():
        grpo_backward(policy, [group], config, plan=[[step]])
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])))
        for p in parameters:
            p.grad = None
    return norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expert", default="contrast", choices=list(EXPERTS))
    parser.add_argument("--groups", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    room = ControlRoom(workdir=tempfile.mkdtemp(prefix="bench-step-gradients-"), config=RoomConfig())
    c, policy, expert, prompts = room.config, room.policy, EXPERTS[args.expert], all_prompts()
    print(f"{args.groups} groups of {c.survivors}, {c.steps} steps, {args.expert} expert; adapter gradient norm per step")
    for g in range(args.groups):
        prompt = prompts[g % len(prompts)]
        drawn = room.sampler.draw(prompt, g, c.survivors, steps=c.steps, guidance=c.guidance, eta=c.eta)
        ids = [f"c{i}" for i in range(len(drawn.survivors))]
        tiers = expert.rank(ids, [k.image for k in drawn.survivors])
        group = RankedGroup(f"g{g}", ids, drawn.trajectory, [(tiers, 3)])
        stds = [policy.step_std(group.trajectory, j) for j in group.trajectory.scored_steps()]
        if g == 0:
            print(f"{'kernel std':48s}", " ".join(f"{s:.2g}" for s in stds))
        norms = step_gradient_norms(policy, group, c.update)
        mean_std = sum(stds) / len(stds)
        print(f"{prompt[:40]:40s} uniform", " ".join(f"{n:.2g}" for n in norms))
        print(f"{'':40s} noise  ", " ".join(f"{n * s / mean_std:.2g}" for n, s in zip(norms, stds)), flush=True)


if __name__ == "__main__":
    main()
