"""Text embeddings beside the latents: a T5 / mT5 / UMT5 encoder (Hugging Face layout, loaded with
`transformers`) run in the encoder actor on the captions of a unit.

A text encoder folder holds `config.json`, safetensors weights (`model.safetensors` or shards with
an index) and tokenizer files (`tokenizer.json`, or `spiece.model` with `tokenizer_config.json`).
Pickled weights (`*.bin`, `*.pt`) are refused: weights load with safetensors only. Its identity is
the sha256 over its weight files (the settings fingerprint includes it, so a folder never mixes
text encoders).

Embeddings are the encoder's last hidden state of the caption's tokens (the padding cut off):
`text_tokens` rows of `d_model`, stored in the text precision's dtype (bf16 on CUDA, fp32 on CPU by
default). Identical captions in a unit are encoded once. A caption longer than the maximum length
is truncated to it, and the row's metadata notes it.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_TYPES = ("t5", "mt5", "umt5")
DEFAULT_MAX_LENGTH = 512
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


class TextEncoderError(ValueError):
    """A text encoder folder that cannot be used: one line, exit 2 before Ray starts."""


@dataclass(frozen=True)
class Embedded:
    values: torch.Tensor     # (tokens, d_model) in the stored dtype, on the CPU
    tokens: int              # tokens of the caption (after truncation)
    truncated: bool


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors weights; pickled weights or none at all are a TextEncoderError."""
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"--text-encoder {path}: no config.json (a Hugging Face T5/mT5/UMT5 encoder folder)")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise TextEncoderError(f"--text-encoder {path}: no safetensors weights" + (
            f" ({', '.join(pickled)} are pickled: convert them to safetensors; they are never unpickled)"
            if pickled else ""))
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TextEncoderError(f"--text-encoder {path}: no tokenizer files ({' or '.join(_TOKENIZER_FILES)}); "
                               "save the tokenizer beside the model (tokenizer.save_pretrained)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise TextEncoderError(f"--text-encoder {path}: model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    return weights


def identity(path: str | Path) -> str:
    """sha256 over the weight files, in name order (what the settings fingerprint records)."""
    digest = hashlib.sha256()
    for file in weight_files(Path(path)):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


class TextEncoder:
    def __init__(self, path: str | Path, precision: str = "auto", device: str = "cpu", max_length: int | None = None):
        from transformers import AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the job's console is ours
        hf_logging.set_verbosity_error()
        path = Path(path)
        weight_files(path)
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        cls = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}[model_type]
        self.device = torch.device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = cls.from_pretrained(path, use_safetensors=True, dtype=self.dtype).to(self.device).eval()
        self.max_length = max_length or default_max_length(self.tokenizer)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, Embedded]:
        """Each distinct caption once, in one padded batch."""
        unique = sorted(set(captions))
        if not unique:
            return {}
        batch = self.tokenizer(unique, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        lengths = batch["attention_mask"].sum(1).tolist()
        at_limit = [t for t, n in zip(unique, lengths) if n >= self.max_length]  # truncated, or exactly as long
        cut = {t for t, ids in zip(at_limit, self.tokenizer(at_limit)["input_ids"] if at_limit else [])
               if len(ids) > self.max_length}
        return {text: Embedded(hidden[i, :n].to("cpu").contiguous(), int(n), text in cut)
                for i, (text, n) in enumerate(zip(unique, lengths))}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def default_max_length(tokenizer) -> int:
    """The tokenizer's own model_max_length when it states one, else DEFAULT_MAX_LENGTH."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 100_000 else DEFAULT_MAX_LENGTH


def caption_of(clip) -> str | None:
    """The text a clip's embedding is made of: the span's caption, else the sample's txt, else its
    JSON's "caption" (what the latent row's caption column stores)."""
    if clip.caption:
        return clip.caption
    try:
        meta = json.loads(clip.metadata or "null") or {}
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    text = meta.get("txt")
    if not (isinstance(text, str) and text.strip()) and isinstance(meta.get("json"), dict):
        text = meta["json"].get("caption")
    return text.strip() if isinstance(text, str) and text.strip() else None
