"""Stable Diffusion 1.5, mmgen against diffusers: the same random weights (the real SD 1.5 shapes, an 860M-parameter
UNet), converted with mmgen.diffusion.unet_interop / stable_diffusion, timed interleaved in one process.

    python bench/stable_diffusion.py                   # CPU: one CFG denoising step (UNet batch 2) at 64x64 latents
    python bench/stable_diffusion.py --loop            # + the whole 25-step DPM-Solver++ loop at 16x16 latents
    python bench/stable_diffusion.py --gpu             # GPU: 512x512 images in bf16, 25 DPM-Solver++ steps, CFG:
                                                       #   images/s of the whole pipelines, eager and torch.compile
    python bench/stable_diffusion.py --smoke           # every part on tiny shapes, CPU, seconds (checks the script)

Step: one classifier-free-guided denoising step as SD pipelines take it: the UNet on the latent twice (unconditional
and text halves of one batch of 2) with 77 random 768-wide text states, then uncond + 7.5 (text - uncond). The mmgen
UNet's weights are views of diffusers' (q/k/v stacked), so both fit in memory at once; the outputs' largest
difference is printed beside the times. Loop: 25 such steps with DPM-Solver++(2M) ("trailing" spacing), mmgen's
sampler against diffusers' DPMSolverMultistepScheduler. Pipelines (--gpu): text encoding, 25 steps, VAE decoding,
`--images` prompts per call, StableDiffusionPipeline against TextToImagePipeline, then both again with
`unet.compile()` (torch.compile). The two sides alternate within each repeat (order flipped between repeats); the
ratio is diffusers' median time over mmgen's (above 1: mmgen is faster). Peak memory: on CUDA the allocator's peak
above what the models hold; on CPU the process's peak RSS above the resting RSS, sampled every millisecond.
Results go to bench/results/stable_diffusion[-gpu].json (--out to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from timing import interleaved_seconds, synchronize

from mmgen.diffusion.samplers import SamplerConfig, sample_loop
from mmgen.diffusion.stable_diffusion import from_diffusers_parts, noise_schedule_from_scheduler, write_clip_bpe_files
from mmgen.diffusion.unet import UNet
from mmgen.diffusion.unet_interop import unet_config_from_diffusers, unet_state_from_diffusers

RESULTS = Path(__file__).resolve().parent / "results"
GUIDANCE = 7.5

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5's unet/config.json
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=49406, eos_token_id=49407)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="epsilon")
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1,
                sample_size=64)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def machine(device: torch.device) -> dict:
    """Where the figures were taken."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = models[0] if models else platform.processor()
    return {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def peak_memory_mib(run, device: torch.device) -> float:
    """MiB that one call of `run` needs at its peak above what is allocated (CUDA) or resident (CPU) before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    process, peak, done = psutil.Process(), [0], threading.Event()
    before = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0] - before, 0) / 2**20


def summary(seconds: dict[str, list[float]], per_call: int = 1) -> dict:
    """Median seconds per call, calls per second x per_call (images/s), and diffusers / mmgen."""
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    out = {name: {"median_s": medians[name], "per_s": per_call / medians[name], "all_s": seconds[name]}
           for name in seconds}
    out["ratio_diffusers_over_mmgen"] = medians["diffusers"] / medians["mmgen"]
    return out


def unets(unet_config: dict, device, dtype):
    """diffusers' UNet2DConditionModel (random init) and mmgen's UNet sharing its weights (views where possible)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(**unet_config).to(device).eval()
    if dtype != torch.float32:  # diffusers warns about any dtype cast, float32's included
        reference.to(dtype)
    config = unet_config_from_diffusers(reference.config)
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict(unet_state_from_diffusers(config, reference.state_dict()), assign=True)
    return reference, ours.eval()


def cfg(output: torch.Tensor) -> torch.Tensor:
    unconditional, conditional = output.chunk(2)
    return unconditional + GUIDANCE * (conditional - unconditional)


@torch.no_grad()
def bench_step(reference, ours, latent_size: int, context_dim: int, repeats: int, device, dtype) -> dict:
    """One CFG denoising step, both UNets on the same inputs."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, latent_size, latent_size, generator=generator).to(device, dtype)
    states = torch.randn(2, 77, context_dim, generator=generator).to(device, dtype)
    batch, t = torch.cat([latents, latents]), torch.tensor([500, 500], device=device)
    steps = {
        "diffusers": lambda: cfg(reference(batch, t, encoder_hidden_states=states).sample),
        "mmgen": lambda: cfg(ours(batch, t, context=states)),
    }
    difference = (steps["diffusers"]().float() - steps["mmgen"]().float()).abs().max().item()
    result = summary(interleaved_seconds(steps, repeats, 1, device))
    result["max_abs_difference"] = difference
    result["peak_mib"] = {name: peak_memory_mib(step, device) for name, step in steps.items()}
    return result


@torch.no_grad()
def bench_loop(reference, ours, latent_size: int, context_dim: int, steps: int, repeats: int, device, dtype) -> dict:
    """The whole DPM-Solver++(2M) loop with CFG: diffusers' scheduler against mmgen's sampler."""
    from diffusers import DPMSolverMultistepScheduler

    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, latent_size, latent_size, generator=generator).to(device, torch.float32)
    states = torch.randn(2, 77, context_dim, generator=generator).to(device, dtype)
    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER, timestep_spacing="trailing", steps_offset=1)
    sampler_config = SamplerConfig(kind="dpm++", steps=steps, spacing="trailing", clip_sample=False)
    schedule = noise_schedule_from_scheduler(SD15_SCHEDULER)

    def theirs():
        scheduler.set_timesteps(steps, device=device)
        x = latents.clone()
        for t in scheduler.timesteps:
            output = reference(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=states).sample
            x = scheduler.step(cfg(output).float(), t, x).prev_sample
        return x

    def model_fn(x, t):
        return cfg(ours(torch.cat([x, x]).to(dtype), torch.cat([t, t]), context=states)).float()

    def mine():
        return sample_loop(model_fn, sampler_config.build(schedule), tuple(latents.shape), x_T=latents.clone(),
                           progress=False, device=device)

    difference = (theirs() - mine()).abs().max().item()
    result = summary(interleaved_seconds({"diffusers": theirs, "mmgen": mine}, repeats, 1, device))
    result["max_abs_difference"] = difference
    result["peak_mib"] = {"diffusers": peak_memory_mib(theirs, device), "mmgen": peak_memory_mib(mine, device)}
    return result


def pipelines(unet_config: dict, vae_config: dict, text_config: dict, device, dtype):
    """diffusers' StableDiffusionPipeline and mmgen's TextToImagePipeline on the same random SD weights."""
    import transformers
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from mmgen.pipelines.text2img import TextToImagePipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = write_clip_bpe_files(Path(scratch))
        tokenizer = transformers.CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>",
                                               model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER, timestep_spacing="trailing", steps_offset=1)
    model = from_diffusers_parts(unet, vae, text_encoder, tokenizer.pad_token_id,
                                 noise_schedule_from_scheduler(SD15_SCHEDULER))
    theirs = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False).to(device=device, dtype=dtype)
    theirs.set_progress_bar_config(disable=True)
    ours = TextToImagePipeline(model.to(device=device, dtype=dtype),
                               sampler=SamplerConfig(kind="dpm++", spacing="trailing", clip_sample=False))
    return theirs, ours


def bench_pipelines(theirs, ours, images: int, steps: int, repeats: int, compile_unets: bool, device) -> dict:
    """Images/s of both whole pipelines (eager; then with torch.compile on both UNets when compile_unets)."""
    prompts = [f"a photograph of an astronaut riding a horse, number {index}" for index in range(images)]

    def run(pipeline_theirs: bool):
        if pipeline_theirs:
            return lambda: theirs(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pil")
        return lambda: ours(prompts, steps=steps, guidance_scale=GUIDANCE, progress=False)

    calls = {"diffusers": run(True), "mmgen": run(False)}
    results = {"eager": summary(interleaved_seconds(calls, repeats, 1, device), per_call=images)}
    results["eager"]["peak_mib"] = {name: peak_memory_mib(call, device) for name, call in calls.items()}
    print("pipelines (eager): " + report(results["eager"], unit="images/s"), flush=True)
    if compile_unets:
        theirs.unet.compile()
        ours.model.unet.compile()
        results["compiled"] = summary(interleaved_seconds(calls, repeats, 1, device), per_call=images)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, whole pipelines at 512x512 (eager + compile)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: check every part in seconds")
    parser.add_argument("--loop", action="store_true", help="also time the 25-step DPM-Solver++ loop")
    parser.add_argument("--latent", type=int, default=64, help="latent size of the single step (64: 512 px)")
    parser.add_argument("--loop-latent", type=int, default=16, help="latent size of the CPU loop")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--images", type=int, default=4, help="prompts per pipeline call (--gpu)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile pass of --gpu")
    parser.add_argument("--out", help="results JSON (default: bench/results/stable_diffusion[-gpu].json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    unet_config = TINY_UNET if args.smoke else SD15_UNET
    latent = 8 if args.smoke else args.latent
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "machine": machine(device), "dtype": str(dtype).removeprefix("torch.")}
    reference, ours = unets(unet_config, device, dtype)
    results["unet_parameters"] = sum(parameter.numel() for parameter in reference.parameters())
    print(f"UNet: {results['unet_parameters'] / 1e6:.0f}M parameters, {device}, {results['dtype']}", flush=True)
    results["step"] = bench_step(reference, ours, latent, unet_config["cross_attention_dim"], args.repeats, device,
                                 dtype)
    results["step"]["latent"] = latent
    print(f"one CFG step at {latent}x{latent} latents: " + report(results["step"]), flush=True)
    if args.loop or args.smoke or args.gpu:
        loop_latent = 8 if args.smoke else (args.latent if args.gpu else args.loop_latent)
        results["loop"] = bench_loop(reference, ours, loop_latent, unet_config["cross_attention_dim"], args.steps,
                                     args.repeats, device, dtype)
        results["loop"]["latent"] = loop_latent
        print(f"{args.steps}-step DPM-Solver++ loop at {loop_latent}x{loop_latent}: " + report(results["loop"]),
              flush=True)
    del reference, ours
    if args.gpu or args.smoke:
        shapes = (TINY_UNET, TINY_VAE, TINY_TEXT) if args.smoke else (SD15_UNET, SD15_VAE, SD15_TEXT)
        theirs, mine = pipelines(*shapes, device, dtype)
        results["pipelines"] = bench_pipelines(theirs, mine, 2 if args.smoke else args.images, args.steps,
                                               args.repeats, args.gpu and not args.no_compile, device)
        if "compiled" in results["pipelines"]:
            print("pipelines (compiled): " + report(results["pipelines"]["compiled"], unit="images/s"), flush=True)
    out = Path(args.out) if args.out else RESULTS / ("stable_diffusion-gpu.json" if args.gpu else "stable_diffusion.json")
    if not args.smoke or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return results


def report(result: dict, unit: str = "s") -> str:
    """One line: each side's median (or rate), the ratio, peak memory and the outputs' difference."""
    sides = []
    for name in ("diffusers", "mmgen"):
        value = f"{result[name]['per_s']:.3f} {unit}" if unit != "s" else f"{result[name]['median_s']:.3f} s"
        peak = result.get("peak_mib", {}).get(name)
        sides.append(f"{name} {value}" + (f" (peak +{peak:.0f} MiB)" if peak is not None else ""))
    line = ", ".join(sides) + f"; diffusers/mmgen time {result['ratio_diffusers_over_mmgen']:.2f}x"
    if "max_abs_difference" in result:
        line += f"; max |difference| {result['max_abs_difference']:.2e}"
    return line


if __name__ == "__main__":
    main()
