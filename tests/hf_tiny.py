"""Tiny, randomly initialised Hugging Face CLIP and SigLIP checkpoints built offline, for the hf: tests."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of on in left right above below small large red green blue yellow circle square star cross dog".split()
)
SPECIALS = ["[PAD]", "[UNK]", "[BOS]"]  # [EOS] comes last: CLIP finds the end of a text by its id


def tiny_tokenizer(family: str, max_length: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + ["[EOS]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "[BOS] $A [EOS]" if family == "clip" else "$A [EOS]"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
    )


def tiny_checkpoint(path: Path, family: str, seed: int = 0) -> Path:
    """save_pretrained of a 2-layer, 32-wide model on 32 px images, with its tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    max_length = 16
    tokenizer = tiny_tokenizer(family, max_length)
    eos = tokenizer.convert_tokens_to_ids("[EOS]")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=2,
        eos_token_id=eos,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    if family == "clip":
        from transformers import CLIPImageProcessorPil as Processor

        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = Processor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    else:
        from transformers import SiglipImageProcessorPil as Processor

        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = Processor(size={"height": 32, "width": 32})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path
