"""Compile every Triton kernel variant our launchers can launch to GPU code, on a machine without
a GPU, and report registers, spills and shared memory per variant.

    python -m kernels.aot --arch sm_90 [--arch sm_80] [--json out.json]

The launchers themselves are called (kernels/haar_triton.py, kernels/norm_triton.py) on meta
tensors (shapes and strides, no memory) of the shapes WF-VAE-L and -S give them at 256x256,
512x512 and 1280x720 (batch 1 and 8, first and later chunks, bf16 and fp32, channels-last and
standard layouts, with and without an `out=` view or an add_low); what each would launch is
recorded instead of run, specialised by Triton's own binder for the target (so the integer
divisibility and alignment attributes are the ones a real launch would see), deduplicated, and
compiled with Triton's bundled ptxas. Exit 1 on a compile error or on any variant that spills
registers.

Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions).
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PRESET_NORMS = {  # ChannelNorm widths (encoder and decoder) of the released models
    "wfvae-l-16chn": (128, 192, 384, 512, 768, 896),
    "wfvae-s-8chn": (128, 256, 320, 512, 640),
}
SIZES = {"256x256": (256, 256), "512x512": (512, 512), "720p": (720, 1280)}
BATCHES = (1, 8)
DTYPES = (torch.bfloat16, torch.float32)
CHUNK = 16  # the engine's default: a first chunk of 1+16 frames, later ones of 16


@dataclass
class Variant:
    kernel: str
    what: str             # the call it came from
    signature: str        # the specialised signature key (dedupes variants)
    constants: dict       # compile-time arguments by name (flags, block sizes, strides of 1)
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads
    shared_bytes: int = 0
    error: str | None = None


# ---- recording launches -------------------------------------------------------------------------
@contextlib.contextmanager
def recording():
    """JITFunction.run records (kernel, args, kwargs) instead of launching."""
    from triton.runtime.jit import JITFunction
    launches, original = [], JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def empty(shape, dtype, layout=torch.contiguous_format):
    """A tensor with shape and strides but no memory (data_ptr 0: aligned, as real allocations are)."""
    return torch.empty(shape, dtype=dtype, memory_format=layout, device="meta")


def frames_view(shape, dtype, layout, context=2):
    """What the model passes as norm `out=`: the frames of a causal conv's input buffer."""
    b, c, t, h, w = shape
    return empty((b, c, t + context, h, w), dtype, layout)[:, :, context:]


def launch_calls():
    """(description, thunk) for every launcher call to record."""
    from kernels import haar_triton, norm_triton
    layouts = {"channels_last": torch.channels_last_3d, "standard": torch.contiguous_format}
    for size, (h, w) in SIZES.items():
        for b in BATCHES:
            for dtype in DTYPES:
                for lname, layout in layouts.items():
                    tag = f"{size} b{b} {str(dtype)[6:]} {lname}"
                    for first, t in ((True, CHUNK + 1), (False, CHUNK)):
                        video = empty((b, t, h, w, 3), torch.uint8).permute(0, 4, 1, 2, 3)
                        yield (f"haar_pyramid uint8 {tag} {'first' if first else 'later'}",
                               lambda video=video, first=first, dtype=dtype, layout=layout:
                               haar_triton.haar_pyramid(video, first, dtype, layout))
                        yield (f"haar_pyramid float {tag} {'first' if first else 'later'}",
                               lambda b=b, t=t, h=h, w=w, first=first, dtype=dtype, layout=layout:
                               haar_triton.haar_pyramid(empty((b, 3, t, h, w), dtype), first, dtype, layout))
                    for widths in set(PRESET_NORMS.values()):
                        for c in widths:
                            for level in (1, 2, 3):
                                shape = (b, c, CHUNK // 2 ** level + 1, h >> level, w >> level)
                                x = empty(shape, dtype, layout)
                                for silu in (True, False):
                                    yield (f"channel_layer_norm c{c} level{level} silu={silu} {tag}",
                                           lambda x=x, c=c, silu=silu, dtype=dtype:
                                           norm_triton.channel_layer_norm(x, empty((c,), dtype), empty((c,), dtype),
                                                                          1e-6, silu))
                                yield (f"channel_layer_norm c{c} level{level} out=frames {tag}",
                                       lambda x=x, c=c, dtype=dtype, layout=layout, shape=shape:
                                       norm_triton.channel_layer_norm(x, empty((c,), dtype), empty((c,), dtype), 1e-6,
                                                                      True, frames_view(shape, dtype, layout)))
                    for add in (False, True):  # the decoder's inverse transforms (3 video channels)
                        t2, h2, w2 = CHUNK // 4, h // 4, w // 4
                        x3 = empty((b, 24, t2, h2, w2), dtype, layout)
                        low = empty((b, 3, t2, h2, w2), dtype, layout) if add else None
                        yield (f"inverse_haar3d add_low={add} {tag}",
                               lambda x3=x3, low=low: haar_triton.inverse_haar3d(x3, True, low))
                        x2 = empty((b, 12, CHUNK, h // 2, w // 2), dtype, layout)
                        low2 = empty((b, 3, CHUNK, h // 2, w // 2), dtype, layout) if add else None
                        yield (f"inverse_haar2d add_low={add} {tag}",
                               lambda x2=x2, low2=low2: haar_triton.inverse_haar2d(x2, low2))


# ---- specialising and compiling -----------------------------------------------------------------
def specialise(kernel, args, kwargs, backend):
    """What JITFunction.run hands to triton.compile for these launch arguments on `backend`."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def compile_variant(kernel, packed, target, ptxas: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill bytes, shared bytes) of the compiled variant."""
    import triton
    from triton.compiler import ASTSource
    options, signature, constexprs, attrs = packed
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        report = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills, compiled.metadata.shared


_PENDING: list = []  # (kernel, packed) to compile: inherited by the forked workers, not pickled


def variants_for(arch: int, workers: int) -> list[Variant]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", arch, 32))
    seen: dict[str, Variant] = {}
    _PENDING.clear()
    for what, call in launch_calls():
        with recording() as launches:
            call()
        for kernel, args, kwargs in launches:
            packed = specialise(kernel, args, kwargs, backend)
            key = f"{kernel.__name__} {packed[1]} {sorted(packed[2].items())} {sorted(packed[3].items())}"
            if key not in seen:
                constants = {kernel.arg_names[path[0]]: value for path, value in packed[2].items()}
                seen[key] = Variant(kernel.__name__, what, key, constants)
                _PENDING.append((kernel, packed))
    variants = list(seen.values())
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for variant, result in zip(variants, pool.map(_compile_pending, range(len(variants)), [arch] * len(variants))):
            if isinstance(result, str):
                variant.error = result
            else:
                variant.registers, variant.spill_bytes, variant.shared_bytes = result
    return variants


def _compile_pending(i: int, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    kernel, packed = _PENDING[i]
    try:
        return compile_variant(kernel, packed, GPUTarget("cuda", arch, 32), get_ptxas(arch).path, arch)
    except Exception as exc:  # noqa: BLE001 - reported per variant, the run fails at the end
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def arch_number(text: str) -> int:
    m = re.fullmatch(r"(?:sm_)?(\d{2,3})a?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--arch {text!r}: expected e.g. sm_90 or sm_80")
    return int(m.group(1))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: unset TRITON_INTERPRET (the interpreter replaces the kernels it compiles)", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=arch_number, action="append", help="sm_90 (default), sm_80, ... (repeatable)")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="compile processes (default: every core)")
    args = p.parse_args(argv)
    failed, table = False, {}
    for arch in args.arch or [90]:
        variants = variants_for(arch, args.workers)
        table[f"sm_{arch}"] = [asdict(v) for v in variants]
        print(f"sm_{arch}: {len(variants)} variants")
        print(f"  {'kernel':24s} {'regs':>4s} {'spill B':>7s} {'smem B':>7s}  first launched by")
        for v in sorted(variants, key=lambda v: (v.kernel, -v.registers)):
            bad = v.error or v.spill_bytes
            failed |= bool(bad)
            line = v.error or f"{v.registers:4d} {v.spill_bytes:7d} {v.shared_bytes:7d}"
            print(f"{'!' if bad else ' '} {v.kernel:24s} {line}  {v.what}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    if failed:
        print("kernels.aot: a variant failed to compile or spills registers (marked !)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
