"""A tiny random transformers CLIP (text and vision towers, tokenizer, image processor) saved
to a folder, for tests that need local CLIP weights without a download.

The tokenizer is CLIP's byte-level BPE with no merges: its vocabulary is the 256 byte symbols,
each also with the end-of-word mark, and the two special tokens, so every text tokenises
(one token per character)."""
from __future__ import annotations

import json
import os


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable unicode table
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_clip_tokenizer(path: str) -> None:
    """vocab.json, merges.txt and the tokenizer configs of a merge-free CLIP tokenizer."""
    from transformers import CLIPTokenizer
    os.makedirs(path, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    tokenizer.save_pretrained(path)


def save_tiny_clip(path: str, seed: int = 0, image_size: int = 32) -> str:
    """A random CLIPModel (width 32, one layer per tower, projection 16) with its tokenizer and
    an image processor for ``image_size`` pixels, saved to ``path``; returns ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    write_tiny_clip_tokenizer(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
