"""The text path (--text-encoder) against a plain transformers loop over the same captions, in the
same run: captions/s of text/encoder.py's TextEncoder (distinct captions of a unit in one padded
batch) and of `T5EncoderModel` called batch by batch on the same captions. Plus the compute a real
text encoder costs: FLOPs per caption of mT5-XXL's encoder at 512 tokens, from its config, and the
lower bound that puts on an H100 (989 TFLOP/s dense bf16) -- an estimate, not a measurement.

    python -m benchmarks.bench_text [--captions 512 --unit 64 --d-model 256 --layers 4 --device cpu]

Writes benchmarks/results/text_<device>.json.
"""
import argparse
import random
import tempfile
import time

import torch

from benchmarks.common import environment, write_json
from encoder_service.samples import write_text_encoder
from encoder_service.text.encoder import TextEncoder

MT5_XXL = {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "d_kv": 64, "num_layers": 24, "gated": True}
H100_BF16_FLOPS = 989e12


def encoder_flops(cfg: dict, tokens: int) -> float:
    """Forward FLOPs of a T5-family encoder over one sequence: 2 per weight per token (attention
    projections, gated FFN) plus the attention scores and weighted sums (4 x tokens x heads x d_kv)."""
    inner = cfg["num_heads"] * cfg["d_kv"]
    weights = 4 * cfg["d_model"] * inner + (3 if cfg["gated"] else 2) * cfg["d_model"] * cfg["d_ff"]
    per_token = 2 * weights + 4 * tokens * inner
    return cfg["num_layers"] * per_token * tokens


def captions(n: int, seed: int = 0) -> list[str]:
    words = "a the test card later runs past end video of cat dog red blue green one two three four five".split()
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(n // 2)]
    return [rng.choice(pool) for _ in range(n)]  # spans of one video share captions: about half distinct


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", type=int, default=512)
    p.add_argument("--unit", type=int, default=64, help="captions per encoder call (a unit's clips)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer, T5EncoderModel
    texts = captions(args.captions)
    with tempfile.TemporaryDirectory() as d:
        write_text_encoder(d, d_model=args.d_model, max_length=512, layers=args.layers)
        ours = TextEncoder(d, "fp32", args.device)
        tok = AutoTokenizer.from_pretrained(d)
        model = T5EncoderModel.from_pretrained(d, use_safetensors=True).to(args.device).eval()

        def plain():
            with torch.no_grad():
                for lo in range(0, len(texts), args.unit):
                    batch = tok(texts[lo:lo + args.unit], padding=True, return_tensors="pt").to(args.device)
                    model(**batch).last_hidden_state.cpu()

        def service():
            for lo in range(0, len(texts), args.unit):
                ours.encode(texts[lo:lo + args.unit])

        results = {}
        for name, fn in (("transformers_loop", plain), ("text_encoder", service)):
            fn()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best = min(times)
            results[name] = {"seconds": round(best, 4), "captions_per_s": round(len(texts) / best, 1)}
            print(f"{name:18s} {results[name]['captions_per_s']:.0f} captions/s", flush=True)
    ratio = round(results["text_encoder"]["captions_per_s"] / results["transformers_loop"]["captions_per_s"], 3)
    flops = encoder_flops(MT5_XXL, 512)
    estimate = {"model": "mT5-XXL encoder (config values)", "tokens": 512, "tflop_per_caption": round(flops / 1e12, 2),
                "h100_bf16_ms_per_caption_lower_bound": round(flops / H100_BF16_FLOPS * 1e3, 2)}
    print(f"text_encoder / transformers loop: {ratio}x (target >= 0.9); mT5-XXL at 512 tokens: "
          f"{estimate['tflop_per_caption']} TFLOP per caption, >= {estimate['h100_bf16_ms_per_caption_lower_bound']} "
          "ms on an H100 (an estimate)")
    out = {"benchmark": "text_path", "env": environment(args.device), "captions": args.captions,
           "distinct": len(set(texts)), "unit": args.unit, "d_model": args.d_model, "results": results,
           "text_encoder_over_transformers": ratio, "estimate": estimate,
           "note": f"{args.device} figures; a random-weight T5 of d_model {args.d_model}"}
    write_json(f"text_{args.device}", out)
    return out


if __name__ == "__main__":
    main()
