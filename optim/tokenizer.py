"""A CLIP tokenizer built locally from the phantom prompts' vocabulary.

The default generator must load through ``StableDiffusionPipeline.from_pretrained`` exactly like
a real checkpoint, so its tokenizer is a genuine ``CLIPTokenizer`` (``vocab.json`` +
``merges.txt``). Rather than download CLIP's 49k-token BPE, we write a tiny BPE whose merges spell
out every word of the prompt vocabulary, so each known word is one token. Unknown words still
tokenize, letter by letter, because every single character is in the vocabulary too.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def _words(prompts: list[str]) -> list[str]:
    """Lower-cased words as CLIP's pre-tokenizer splits them (letters, digits, punctuation)."""
    words = set()
    for prompt in prompts:
        words.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", prompt.lower()))
    return sorted(words)


def build_clip_tokenizer(prompts: list[str], out_dir: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """Write ``vocab.json`` and ``merges.txt`` for ``prompts`` into ``out_dir`` and load them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []

    def add_merges(pieces: list[str]) -> None:
        while len(pieces) > 1:  # join left to right: every prefix of the word becomes a token
            line = f"{pieces[0]} {pieces[1]}"
            if line not in merges:
                merges.append(line)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]

    words = _words(prompts)
    for word in words:
        add_merges(list(word[:-1]) + [word[-1] + "</w>"])
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    # Merges of different words compete (BPE applies the lowest-ranked pair first), so a word can
    # end up split. Append merges that join whatever pieces it ended as, until every word is whole.
    for _ in range(20):
        tokenizer = _write_and_load(out_dir, vocab, merges, max_length)
        split = [tokenizer.tokenize(word) for word in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            add_merges(pieces)
    else:
        raise RuntimeError(f"could not make every word one token: {split[:3]}")
    # Not save_pretrained: its tokenizer.json drops merges whose result is already a token, so a
    # reload would split words again. vocab.json + merges.txt + this config reload faithfully.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer


def _write_and_load(out_dir: Path, vocab: dict, merges: list[str], max_length: int) -> CLIPTokenizer:
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def build_t5_tokenizer(prompts: list[str], out_dir: str | Path, max_length: int = 32):
    """A T5 tokenizer (``T5TokenizerFast``, what SD 3 and FLUX pipelines load) built locally for ``prompts``.

    A unigram model whose vocabulary is T5's special tokens, every word of the prompts as written, lower-
    cased and upper-cased (SentencePiece style, "▁word"), and every single character, so known words are
    one token and anything else still tokenizes. Written with ``save_pretrained`` (tokenizer.json).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w for prompt in prompts for word in re.findall(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]+", prompt)
                    for w in (word, word.lower(), word.upper())})
    characters = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in words] + [(c, -5.0) for c in characters]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                                model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
