"""The locally built CLIP tokenizer: every prompt word is one token, and a reload agrees."""

from transformers import CLIPTokenizer

from data.phantoms import all_prompts
from optim.tokenizer import build_clip_tokenizer


def test_every_vocabulary_word_is_one_token_and_reload_agrees(tmp_path):
    built = build_clip_tokenizer(all_prompts(), tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for prompt in all_prompts():
        assert built(prompt).input_ids == reloaded(prompt).input_ids
    tokens = reloaded.tokenize("OCT: retinal layers with intraretinal cysts")
    assert tokens == ["oct</w>", ":</w>", "retinal</w>", "layers</w>", "with</w>", "intraretinal</w>", "cysts</w>"]
    # unknown words still tokenize, letter by letter, without an unknown token
    assert reloaded.unk_token_id not in reloaded("ultrasound").input_ids[1:-1]
