"""Small random-init model folders that mirror each OpenCLIP model family, for offline tests and demos.

Real models of these families come from the Hugging Face hub (``hf-hub:timm/ViT-B-16-SigLIP``, the
``xlm-roberta-base-ViT-B-32`` config with its ``laion5b_s13b_b90k`` weights). Each is a folder holding
``open_clip_config.json`` (the model and preprocessing config), the weights and, for a Hugging Face tokenizer, its
``tokenizer.json``; OpenCLIP loads the same layout from a local folder as ``local-dir:PATH``, which is what
:func:`write_tiny_model` writes, with a tokenizer trained here on the captions given:

* ``clip``: the CLIP BPE family (``ViT-B-32``…) — the bundled ``cliptuner-tiny`` config; nothing is written.
* ``siglip``: SigLIP-style — timm's ViT with an attention-pool (MAP) head and no projection, as SigLIP's image
  tower (the smallest one, ``vit_tiny_patch16_224``, 224 px), mean/std 0.5 and ``squash`` resizing, a text
  transformer without a causal mask that pools the last position (rows padded to the context length), a projection bias, a learnable logit
  bias (initialised at -10, so ``loss=auto`` trains it with the sigmoid loss) and a SentencePiece-style Unigram
  tokenizer that appends ``</s>``, with ``canonicalize`` cleaning.
* ``xlmr``: multilingual-CLIP-style — a Hugging Face XLM-RoBERTa text tower (``transformers``, mean pooling over
  the tokens that are not ``<pad>``) and an XLM-R-style tokenizer (``<s> … </s>``, ``<pad>`` = 1).

The folder's config names the tokenizer and the XLM-R config by absolute path: move the folder and it no
longer loads (as a hub model's cache would not).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

FAMILIES = ("clip", "siglip", "xlmr")
CLIP_ARCH = "cliptuner-tiny"  # the bundled config of the CLIP BPE family
LOCAL_DIR = "local-dir:"
# SigLIP's image tower is timm's ViT with an attention-pool (MAP) head; the smallest timm ViT at its own input size
SIGLIP_TIMM_MODEL = "vit_tiny_patch16_224"
SIGLIP_WIDTH = 192
SIGLIP_IMAGE_SIZE = 224
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# a few captions beyond the synthetic English ones, so that the multilingual vocab covers other scripts
MULTILINGUAL_CAPTIONS = (
    "un petit cercle rouge en haut à gauche",
    "zwei große blaue Quadrate und ein grünes Kreuz",
    "dos triángulos verdes en la esquina inferior",
    "赤い丸と青い四角",
    "красный круг слева",
)


def _captions(captions: Optional[Sequence[str]], seed: int) -> list[str]:
    if captions is not None:
        texts = [str(c) for c in captions if str(c).strip()]
        if not texts:
            raise ValueError("the tokenizer needs at least one non-empty caption to train on")
        return texts
    from cliptuner.train import synthetic

    texts: list[str] = []
    for domain in ("generic", "domain"):
        texts += list(synthetic.generate(n_images=200, domain=domain, seed=seed).captions)
    return texts


def _train_unigram(texts: Sequence[str], out: Path, vocab_size: int, context_length: int) -> int:
    """A SentencePiece-style (T5, SigLIP) Unigram tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": "<pad>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": context_length,
        },
    )
    return tok.get_vocab_size()


def _train_xlmr_bpe(texts: Sequence[str], out: Path, vocab_size: int, context_length: int) -> int:
    """An XLM-R-style tokenizer: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4; ``<s> … </s>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "cls_token": "<s>",
            "pad_token": "<pad>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
            "model_max_length": context_length,
        },
    )
    return tok.get_vocab_size()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _vision_cfg(image_size: int) -> dict[str, Any]:
    return {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}


def _siglip_config(out: Path, vocab_size: int, context_length: int) -> dict[str, Any]:
    return {
        "model_cfg": {
            "embed_dim": SIGLIP_WIDTH,  # SigLIP's image tower has no projection: its width is the embedding size
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": {
                "image_size": SIGLIP_IMAGE_SIZE,
                "timm_model_name": SIGLIP_TIMM_MODEL,
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
            "text_cfg": {
                "context_length": context_length,
                "vocab_size": vocab_size,
                "hf_tokenizer_name": str(out),
                "tokenizer_kwargs": {"clean": "canonicalize"},
                "width": 64,
                "heads": 2,
                "layers": 2,
                "no_causal_mask": True,
                "proj_bias": True,
                "pool_type": "last",
                "norm_kwargs": {"eps": 1e-6},
            },
        },
        "preprocess_cfg": {
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "squash",
        },
    }


def _xlmr_config(out: Path, vocab_size: int, context_length: int, image_size: int) -> dict[str, Any]:
    text = out / "text"
    text.mkdir(exist_ok=True)
    _write_json(
        text / "config.json",
        {
            "model_type": "xlm-roberta",
            "architectures": ["XLMRobertaModel"],
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": context_length + 2,  # RoBERTa's positions start after the pad id
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
        },
    )
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": _vision_cfg(image_size),
            "text_cfg": {
                "hf_model_name": str(text),
                "hf_tokenizer_name": str(out),
                "hf_pooler_type": "mean_pooler",
                "context_length": context_length,
            },
        },
        "preprocess_cfg": {},
    }


def write_tiny_model(
    out_dir: str | Path,
    family: str,
    captions: Optional[Sequence[str]] = None,
    seed: int = 0,
    context_length: int = 24,
    image_size: int = 64,
    vocab_size: int = 400,
) -> str:
    """Write a small random-init model of ``family`` and return the arch name that loads it.

    Args:
        out_dir: the model folder (created; its files are replaced).
        family: one of :data:`FAMILIES`.
        captions: what the tokenizer is trained on (default: synthetic captions of both synthetic domains, plus a
            few in other languages for ``xlmr``).
        seed: seeds the weights (and the default captions).
        context_length: tokens per text.
        image_size: the image tower's input side (``xlmr``; ``siglip`` takes its timm tower's 224 px).
        vocab_size: the trained tokenizer's vocab size (an upper bound: a small corpus may give fewer).

    Returns:
        ``"local-dir:<out_dir>"`` (``cliptuner-tiny`` for ``clip``): a ``ModelSpec.arch`` / ``--arch`` value.

    Raises:
        ValueError: an unknown family or no caption to train the tokenizer on.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if family == "clip":
        return CLIP_ARCH
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    texts = _captions(captions, seed)
    if family == "siglip":
        size = _train_unigram(texts, out, vocab_size, context_length)
        config = _siglip_config(out, size, context_length)
    else:
        size = _train_xlmr_bpe(texts + list(MULTILINGUAL_CAPTIONS), out, vocab_size, context_length)
        config = _xlmr_config(out, size, context_length, image_size)
    _write_json(out / CONFIG_FILE, config)
    (out / WEIGHTS_FILE).unlink(missing_ok=True)
    arch = LOCAL_DIR + str(out)
    torch.manual_seed(seed)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no CLIP weights found": the weights are written next
    try:
        model = open_clip.create_model(arch, pretrained_text=False)
    finally:
        quiet.setLevel(level)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    return arch
