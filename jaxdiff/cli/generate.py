"""`jaxdiff generate`: images from a pretrained diffusers pipeline folder (`jaxdiff.pipelines`).

    jaxdiff generate --model PATH --prompt "a photo of a cat" [--negative_prompt ""]
                     [--steps 25] [--guidance 7.5] [--seed 0] [--num 1] [--height H --width W]
                     [--sampler NAME] [--dtype float32|bfloat16] [--out generated.png]
    jaxdiff generate --model PATH --class 207,360 [--guidance 4.0] ...   (a DiT folder)

PATH: a folder written by diffusers' `save_pretrained` or downloaded from a model hub (it holds
model_index.json; Stable Diffusion 1.x/2.x, SDXL, SD3 without T5, DiT). The folder's scheduler
samples unless --sampler names a jaxdiff sampler (`jaxdiff help sample`: the list). Writes --out
(a PNG grid of the --num images, atomically) and prints one line: the size, steps and seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

USAGE = __doc__.split("\n\n")[1]
EXAMPLE = ('example:\n  jaxdiff generate --model models/stable-diffusion-v1-5 --prompt "a photo '
           'of a cat" --steps 25 --guidance 7.5 --out cat.png')
DTYPES = ("float32", "bfloat16")


class _UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def parser():
    p = _Parser(prog="jaxdiff generate", usage=USAGE.strip(), epilog=EXAMPLE,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Images from a pretrained diffusers pipeline folder.")
    p.add_argument("--model", required=True, help="the pipeline folder (model_index.json)")
    p.add_argument("--prompt", help="text prompt (text-to-image folders)")
    p.add_argument("--negative_prompt", default=None, help="what to steer away from")
    p.add_argument("--class", dest="classes", default=None,
                   help="comma-separated class ids or names (DiT folders)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: none; default 7.5, DiT 4.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--sampler", default=None,
                   help="a jaxdiff sampler instead of the folder's scheduler")
    p.add_argument("--dtype", default="float32", help=f"network dtype: {', '.join(DTYPES)}")
    p.add_argument("--out", default="generated.png")
    return p


def check_flags(args):
    """Formats and ranges (_UsageError: exit 2)."""
    from jaxdiff.samplers import SAMPLERS

    if not os.path.isdir(args.model):
        raise _UsageError(f"--model={args.model} is not a folder")
    if (args.prompt is None) == (args.classes is None):
        raise _UsageError("give --prompt (text-to-image) or --class (DiT), not both or neither")
    for name in ("steps", "num"):
        if getattr(args, name) < 1:
            raise _UsageError(f"--{name}={getattr(args, name)} must be >= 1")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 8:
            raise _UsageError(f"--{name}={getattr(args, name)} must be >= 8")
    if args.guidance is not None and not args.guidance >= 0:
        raise _UsageError(f"--guidance={args.guidance} must be >= 0")
    if args.dtype not in DTYPES:
        raise _UsageError(f"--dtype={args.dtype} is not supported; allowed: {', '.join(DTYPES)}")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise _UsageError(f"--sampler={args.sampler} is unknown; allowed: "
                          f"{', '.join(sorted(SAMPLERS))}")
    if not args.out.lower().endswith(".png"):
        raise _UsageError(f"--out={args.out} must end in .png")


def generate(args):
    import numpy as np

    from jaxdiff import pipelines
    from jaxdiff.eval import images as images_lib

    t0 = time.time()
    pipe = pipelines.load(args.model, dtype=args.dtype)
    loaded = time.time() - t0
    common = dict(steps=args.steps, seed=args.seed, sampler=args.sampler)
    if isinstance(pipe, pipelines.ClassToImage):
        if args.classes is None:
            raise ValueError(f"{args.model} is a class-to-image (DiT) folder: give --class")
        labels = [c.strip() for c in args.classes.split(",") if c.strip()]
        x = pipe(labels * args.num, guidance=4.0 if args.guidance is None else args.guidance,
                 **common)
    else:
        if args.prompt is None:
            raise ValueError(f"{args.model} is a text-to-image folder: give --prompt")
        x = pipe(args.prompt, negative_prompt=args.negative_prompt, num=args.num,
                 height=args.height, width=args.width,
                 guidance=7.5 if args.guidance is None else args.guidance, **common)
    images_lib.save_grid(args.out, np.asarray(x) * 2 - 1)
    print(f"jaxdiff generate: {len(x)} image(s) {x.shape[1]}x{x.shape[2]}, {args.steps} steps, "
          f"load {loaded:.1f} s, sampling + decode {time.time() - t0 - loaded:.1f} s -> "
          f"{args.out}")


def main(argv):
    """argv: the arguments after `generate`. Exit status 2 for bad flags, 1 for what the
    folder or the pipeline refuse."""
    try:
        args = parser().parse_args(argv)
        check_flags(args)
    except _UsageError as e:
        print(f"jaxdiff generate: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code
    try:
        generate(args)
    except (ValueError, OSError) as e:
        print(f"jaxdiff generate: error: {_first_line(e)}", file=sys.stderr)
        return 1
    return 0


def _first_line(e):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
