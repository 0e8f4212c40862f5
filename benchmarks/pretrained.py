"""Pretrained diffusers folders in jaxdiff vs diffusers: load time, peak host memory, and
text-to-image time per sampler step, with the same random weights and settings.

No weights can be downloaded here, so the benchmark writes its own Stable Diffusion folders with
diffusers' `save_pretrained`: "tiny" (the test suite's shapes) and "sd15" (the real SD-1.5
architecture: UNet2DConditionModel 860M parameters, the KL autoencoder, CLIP ViT-L/14's text
encoder; random weights, saved in float16 as the hub's fp16 variant, ~2 GB), deleted afterwards.

Each measurement runs in a fresh subprocess (so peak RSS is its own): it imports its library,
loads the folder (wall time; peak RSS minus the RSS after the imports), then generates at
`--size` with DDIM (the folder's scheduler) and guidance 7.5 for S1 and S2 steps; the time per
step is the difference over S2 - S1 (jaxdiff: its second call of each, compile excluded and
reported; both step counts run one compiled program). jaxdiff and diffusers alternate,
`--repeats` times; medians are reported.

    python benchmarks/pretrained.py [--models tiny,sd15] [--size 256] [--repeats 2]

Prints a table and writes benchmarks/out/pretrained.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out", "pretrained.json")
PROMPT = "a photo of the cat"
STEPS = (2, 6)


def _rss_mb(field="VmHWM"):
    """This process's peak (VmHWM) or current (VmRSS) resident memory, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_folder(path, kind):
    """A StableDiffusionPipeline folder with random weights: "tiny" or "sd15"."""
    import diffusers
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    from tests.test_pipelines import tiny_tokenizer

    torch.manual_seed(0)
    if kind == "tiny":
        tok, vocab = tiny_tokenizer(os.path.join(path, "_tok"))
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=4)
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2,
                                      norm_num_groups=4, layers_per_block=1, sample_size=16)
        text = dict(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=16)
    else:  # the SD-1.5 architecture (runwayml's config.json files)
        tok, vocab = tiny_tokenizer(os.path.join(path, "_tok"), max_length=77)
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
                                              attention_head_dim=8)
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512, scaling_factor=0.18215)
        text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77)
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **text, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind != "tiny":
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(path)
    shutil.rmtree(os.path.join(path, "_tok"))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _child(library, folder, size):
    """One measurement in this (fresh) process: a JSON line on stdout."""
    import numpy as np

    if library == "jaxdiff":
        import jax  # noqa: F401

        from jaxdiff import pipelines
    else:
        import diffusers
        import torch

        torch.set_num_threads(os.cpu_count())
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if library == "jaxdiff":
        pipe = pipelines.load(folder)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder,
                                                                 torch_dtype=torch.float32)
    load_s, load_mb = time.perf_counter() - t0, _rss_mb() - base
    with open(os.path.join(folder, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    shape = (1, size // factor, size // factor, 4)
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times, first = {}, {}
    for steps in STEPS * 2:  # jaxdiff: the first pass compiles
        t0 = time.perf_counter()
        if library == "jaxdiff":
            pipe(PROMPT, steps=steps, guidance=7.5, height=size, width=size, noise=noise)
        else:
            with torch.no_grad():
                pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                     width=size, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                     output_type="np")
        (times if steps in first else first)[steps] = time.perf_counter() - t0
    per_step = (times[STEPS[1]] - times[STEPS[0]]) / (STEPS[1] - STEPS[0])
    compile_s = first[STEPS[0]] - times[STEPS[0]]
    print(json.dumps(dict(load_s=load_s, load_mb=load_mb, peak_mb=_rss_mb(), per_step_s=per_step,
                          fixed_s=times[STEPS[0]] - STEPS[0] * per_step,
                          first_call_extra_s=compile_s)))


def _measure(library, folder, size):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--child", library, folder, str(size)],
                         env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"{library} on {folder} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="tiny,sd15")
    p.add_argument("--size", type=int, default=256, help="image size for the sd15 runs")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1], int(args.child[2]))
    import numpy as np

    rows = []
    for kind in args.models.split(","):
        tmp = tempfile.mkdtemp(prefix=f"jaxdiff-{kind}-")
        try:
            folder = os.path.join(tmp, "pipe")
            t0 = time.perf_counter()
            nbytes = write_folder(folder, kind)
            print(f"{kind}: wrote {nbytes / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            size = 16 if kind == "tiny" else args.size
            runs = {"jaxdiff": [], "diffusers": []}
            for _ in range(args.repeats):
                for library in runs:
                    runs[library].append(_measure(library, folder, size))
                    print(f"  {library}: {runs[library][-1]}", flush=True)
            for library, rs in runs.items():
                med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
                rows.append(dict(model=kind, library=library, size=size,
                                 folder_mib=nbytes / 2**20, **med))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(dict(rows=rows, steps=STEPS, cpus=os.cpu_count()), f, indent=1)
    print(f"\n| model | library | load s | load MiB | peak MiB | s/step ({'{}'}px) |"
          .replace("{}", "size"))
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['library']} | {r['load_s']:.2f} | {r['load_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['per_step_s']:.3f} ({r['size']}) |")


if __name__ == "__main__":
    main()
