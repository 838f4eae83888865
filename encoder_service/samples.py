"""Sample media for the demo, tests and benchmarks: real encoded videos (PyAV) and WebDataset shards."""
from pathlib import Path

import numpy as np


def pattern(i: int, h: int, w: int) -> np.ndarray:
    """Frame i of a moving colour pattern (distinct per frame, smooth enough to compress well)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 3 + i * 7) % 256, (yy * 4 + i * 5) % 256, ((xx + yy) * 2 + i) % 256], -1).astype(np.uint8)


def write_video(path: Path, frames: int = 20, h: int = 64, w: int = 80, fps: int = 24, codec: str = "libx264",
                container_format: str | None = None, gop: int | None = None, rotation: int = 0,
                start: int = 0) -> Path:
    """An encoded video of `pattern` frames start.. start+frames-1, stored h x w; `rotation`: the
    display matrix's counter-clockwise degrees (a phone video shot in portrait)."""
    import av
    with av.open(str(path), "w", format=container_format) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        # one encoder thread: x264's output then never depends on the threads it picks (it picked
        # differently after torch had run in the same process, and the same frames came out different)
        s.options = {"crf": "18", "threads": "1"} if codec == "libx264" else {}
        if gop:
            s.options = {**s.options, "g": str(gop)}
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(start, start + frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24")))
        c.mux(s.encode())
    return path


def write_size_change_video(path: Path, small: tuple[int, int], large: tuple[int, int], frames: int = 12) -> Path:
    """An MPEG-TS stream whose header says `small` and that switches to `large` frames halfway
    (two H.264 segments back to back, as a stream spliced from two sources is)."""
    first = write_video(path.with_suffix(".a.ts"), frames, *small, container_format="mpegts")
    second = write_video(path.with_suffix(".b.ts"), frames, *large, container_format="mpegts", start=frames)
    path.write_bytes(first.read_bytes() + second.read_bytes())
    first.unlink()
    second.unlink()
    return path


def write_vfr_video(path: Path, frames: int = 40, h: int = 64, w: int = 80) -> Path:
    """H.264 with irregular frame spacing (alternating 20 ms and 60 ms): variable frame rate."""
    from fractions import Fraction

    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += 20 if i % 2 else 60
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def write_audio_only(path: Path) -> Path:
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard, written as users write theirs (webdataset.TarWriter): members
    `<key>.<ext>` in sample order, raw bytes, a fixed mtime so the same samples give the same tar."""
    import webdataset as wds
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})
    return path


def write_text_encoder(folder, kind: str = "t5", d_model: int = 16, seed: int = 0, max_length: int = 64,
                       layers: int = 2):
    """A tiny random T5/UMT5 encoder in Hugging Face layout (config.json, model.safetensors, a word-level
    tokenizer made with the `tokenizers` library): what --text-encoder loads, made without a download."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    words = ("a the test card later runs past end video of cat dog red blue green one two three four five six "
             "seven eight nine ten caption clip").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=max_length).save_pretrained(folder)
    config_cls, model_cls = (T5Config, T5EncoderModel) if kind == "t5" else (UMT5Config, UMT5EncoderModel)
    config = config_cls(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder, safe_serialization=True)
    return folder
