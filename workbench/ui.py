"""The Gradio page. Thin: it validates nothing itself and calls the policy for every action.

This first page draws candidates for a prompt; the full control room (ranking, losses, updates,
versions, data) grows on top of it.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # patient data: no analytics, ever

import gradio as gr  # noqa: E402

from data.phantoms import all_prompts  # noqa: E402
from optim.policy import MAX_CANDIDATES, Policy  # noqa: E402

GPU_QUEUE = "gpu"  # generation and updates share one concurrency group: one GPU, one job at a time
MAX_PROMPT_CHARS = 300


def generate(policy: Policy, prompt: str, n: int, seed: int, steps: int, guidance: float):
    """Draw ``n`` candidates; returns gallery items (image, caption) and a status line."""
    if len(prompt or "") > MAX_PROMPT_CHARS:
        raise gr.Error(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        result = policy.sample(prompt, n=int(n), seed=int(seed), steps=int(steps), guidance=float(guidance))
    except ValueError as error:
        raise gr.Error(str(error)) from error
    trajectory = result.trajectory
    items = [
        (image, f"#{i}  seed {s}  mean log-prob {trajectory.log_probs[i].mean():.3f}")
        for i, (image, s) in enumerate(zip(result.images, trajectory.seeds))
    ]
    status = f"{len(items)} candidates from version {policy.version or 'base'}, {steps} DDIM steps, guidance {guidance}"
    return items, status


def build_page(policy: Policy) -> gr.Blocks:
    examples = all_prompts()
    with gr.Blocks(title="Medical preference workbench") as page:
        gr.Markdown(
            "## Medical preference workbench\n"
            f"Model: `{policy.model_path.name}` ({policy.device}). Type a prompt that starts with the modality "
            "(`CT:`, `MRI:`, `chest X-ray:`, `OCT:`) and draw candidates."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="OCT: retinal layers with subretinal fluid", max_length=MAX_PROMPT_CHARS, scale=4)
            generate_button = gr.Button("Generate", variant="primary", scale=1)
        with gr.Row():
            n = gr.Slider(1, min(16, MAX_CANDIDATES), value=4, step=1, label="Candidates")
            seed = gr.Number(value=0, precision=0, label="Seed")
            steps = gr.Slider(5, 50, value=20, step=1, label="DDIM steps")
            guidance = gr.Slider(1.0, 10.0, value=5.0, step=0.5, label="Guidance")
        gr.Examples(examples=[[p] for p in examples], inputs=[prompt], label="Prompts the default model knows")
        gallery = gr.Gallery(label="Candidates", columns=4, height="auto", object_fit="contain")
        status = gr.Markdown()
        generate_button.click(
            lambda *args: generate(policy, *args),
            inputs=[prompt, n, seed, steps, guidance],
            outputs=[gallery, status],
            api_name="generate",
            concurrency_id=GPU_QUEUE,
            concurrency_limit=1,
        )
    return page
