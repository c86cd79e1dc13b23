"""mmgen's UNet against diffusers' UNet2DConditionModel of the same shape: training-step and DDIM sampling
throughput, same inputs, same machine, the two models timed in alternation.

    python bench/diffusion.py                                 # configs/diffusion-shapes.yaml's UNet at 32x32, on CPU
    python bench/diffusion.py --quick                         # a tiny smoke run (writes no results)
    python bench/diffusion.py --device cuda --size 64 --dtype bfloat16
    python bench/diffusion.py --gelu-feedforward              # diffusers with mmgen's feed-forward work (below)

The diffusers model is built from mmgen's UNetConfig (`diffusers_unet`): block_out_channels = base_channels *
channel_multipliers, layers_per_block = blocks_per_level, CrossAttn{Down,Up}Block2D where attention_levels is
true and {Down,Up}Block2D elsewhere, UNetMidBlock2DCrossAttn, attention_head_dim = num_heads (diffusers' legacy
name: for UNet2DConditionModel that argument is the number of heads), cross_attention_dim = context_dim,
norm_num_groups = groups, resnet_time_scale_shift="scale_shift" (mmgen's scale_shift_norm), use_linear_projection
(mmgen's SpatialTransformer projects with Linear layers), and class_embed_type="simple_projection": one Linear from
the pooled vector added to the timestep embedding, exactly mmgen's pooled_proj ("projection" would be a
Linear-SiLU-Linear; addition_embed_type="text" pools the token states by attention instead of taking a vector).

What matches: sinusoidal timestep features (flip_sin_to_cos, shift 0) -> Linear-SiLU-Linear to 4 * base_channels;
ResnetBlock2D = mmgen's ResidualBlock (GroupNorm eps 1e-5, SiLU, 3x3 convs, SiLU-Linear of the embedding as scale
and shift, 1x1 skip conv when the width changes); the down path (stride-2 3x3 conv with padding 1, no downsample
after the last level) and the skips it hands over; the middle block (resnet, transformer, resnet); the up path
(blocks_per_level + 1 resnets per level, skips concatenated, nearest x2 + 3x3 conv except after the last level);
GroupNorm(eps 1e-6) + Linear in / Linear out + residual around each transformer; GroupNorm-SiLU-conv at the output.

The differences that remain (they cannot be switched off through UNet2DConditionModel's config):
- feed-forward: diffusers' BasicTransformerBlock uses GEGLU (Linear dim -> 2 * 4 * dim, one half GELU-gates the
  other, Linear 4 * dim -> dim); mmgen's TransformerBlock a GELU MLP (dim -> 4 * dim -> dim). diffusers does about
  1.5 times the feed-forward work and has 4 * dim^2 more weights per transformer. `--gelu-feedforward` swaps in
  diffusers' own FeedForward(activation_fn="gelu"), which is mmgen's MLP layer for layer: the same work on both
  sides, and the parameter counts then differ only by the attention biases.
- attention projections: diffusers has separate to_q / to_k / to_v without bias; mmgen one fused qkv Linear (one
  kv Linear for cross-attention) with bias. Same FLOPs, fewer and larger matmuls in mmgen.
- padding mask: mmgen passes a boolean mask to scaled_dot_product_attention; diffusers turns
  encoder_attention_mask into an additive -10000 bias.
- initialisation: mmgen zero-initialises the output conv, each residual block's second conv and each transformer's
  proj_out; diffusers does not. Here those mmgen layers are redrawn so both outputs are non-zero (the output-norm
  check below); values do not change the speed.
- dropout is 0 in both (the recipe's 0.1 applies to mmgen's residual blocks and attention; diffusers' `dropout`
  reaches only its resnets).
- diffusers' forward carries more plumbing (ControlNet / adapter / GLIGEN hooks, attention processors, a
  `return_dict` output object); mmgen's forward is a plain loop.

Sampling runs each library's own DDIM loop (mmgen.diffusion.samplers.DDIMSampler + sample_loop, diffusers'
DDIMScheduler), 50 steps of eta 0 on a squaredcos_cap_v2 schedule ("leading" spacing in both) from the same noise.
The schedulers' own arithmetic is negligible: with a network that returns zeros, either 50-step loop over 16 32x32
images takes about 7 ms on a 2-core CPU, against some 40 s with the UNet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from timing import synchronize
from torch import nn
from torch.nn import functional as F

from mmgen.diffusion import UNet, UNetConfig
from mmgen.diffusion.samplers import DDIMSampler, sample_loop
from mmgen.diffusion.schedule import NoiseSchedule

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results" / "diffusion.json"
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def mmgen_unet(config: UNetConfig) -> UNet:
    """mmgen's UNet, its zero-initialised layers redrawn with PyTorch's default init so the output is non-zero."""
    model = UNet(config)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return model


def diffusers_unet(config: UNetConfig, gelu_feedforward: bool = False):
    """diffusers' UNet2DConditionModel configured to match `config` as closely as its options allow.

    gelu_feedforward: replace every transformer's GEGLU feed-forward by diffusers' GELU one (mmgen's MLP).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock, FeedForward

    down = tuple("CrossAttnDownBlock2D" if attends else "DownBlock2D" for attends in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if attends else "UpBlock2D" for attends in reversed(config.attention_levels))
    model = UNet2DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=up,
        block_out_channels=tuple(config.base_channels * multiplier for multiplier in config.channel_multipliers),
        layers_per_block=config.blocks_per_level,
        norm_num_groups=config.groups,
        cross_attention_dim=config.context_dim,
        attention_head_dim=config.num_heads,  # diffusers' legacy name: this is the number of heads
        use_linear_projection=True,
        resnet_time_scale_shift="scale_shift" if config.scale_shift_norm else "default",
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=config.pooled_dim,
        dropout=config.dropout,
    )
    if gelu_feedforward:
        for block in model.modules():
            if isinstance(block, BasicTransformerBlock):
                block.ff = FeedForward(block.norm3.normalized_shape[0], activation_fn="gelu")
    return model


def random_inputs(batch: int, size: int, tokens: int, context_dim: int, pooled_dim: int, device, seed: int = 0):
    """x, t, context, padding mask (True = padding, at least one kept token per row), pooled vector."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator)
    t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=generator)
    context = torch.randn(batch, tokens, context_dim, generator=generator)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    padding = torch.arange(tokens)[None, :] >= lengths[:, None]  # (batch, tokens)
    pooled = torch.randn(batch, pooled_dim, generator=generator)
    return [value.to(device) for value in (x, t, context, padding, pooled)]


def forward_functions(ours: UNet, theirs, context, padding, pooled) -> dict:
    """(x, t) -> prediction for each model, conditioned on the same context, mask and pooled vector."""
    keep = (~padding).to(context.dtype)  # diffusers' encoder_attention_mask: 1 = attend, 0 = padding

    def mmgen_forward(x, t):
        return ours(x, t, context=context, context_padding_mask=padding, pooled=pooled)

    def diffusers_forward(x, t):
        return theirs(x, t, encoder_hidden_states=context, encoder_attention_mask=keep, class_labels=pooled,
                      return_dict=False)[0]

    return {"mmgen": mmgen_forward, "diffusers": diffusers_forward}


def training_step(model: nn.Module, forward, x, t, target, autocast):
    """One step: forward, MSE to `target`, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast():
            loss = F.mse_loss(forward(x, t).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def mmgen_sampling(forward, noise: torch.Tensor, steps: int, autocast):
    """mmgen's DDIM loop (eta 0) from `noise`."""
    sampler = DDIMSampler(NoiseSchedule(**SCHEDULE))

    def sample():
        with torch.no_grad(), autocast():
            return sample_loop(forward, sampler, tuple(noise.shape), num_inference_steps=steps, x_T=noise,
                               progress=False)
    return sample


def diffusers_sampling(forward, noise: torch.Tensor, steps: int, autocast):
    """diffusers' DDIMScheduler loop (eta 0) from `noise`."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SCHEDULE)

    def sample():
        scheduler.set_timesteps(steps)
        x = noise
        with torch.no_grad(), autocast():
            for t in scheduler.timesteps:
                x = scheduler.step(forward(x, t.to(x.device).expand(x.shape[0])), t, x).prev_sample
        return x
    return sample


def interleaved_seconds(functions: dict, repeats: int, warmups: dict, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function after its warm-up; the functions alternate within each repeat (the order
    flipping between repeats), so that load changes on the machine hit both alike."""
    for warmup in warmups.values():
        warmup()
    synchronize(device)
    seconds = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            functions[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summarise(seconds: dict[str, list[float]], batch: int) -> tuple[dict, float]:
    """Per model: items/s from the median seconds, plus every timing; and mmgen/diffusers throughput, the median of
    the per-repeat ratios (a repeat's two calls ran back to back, so each ratio sees nearly the same load)."""
    figures = {name: {"per_s": batch / statistics.median(values), "s_median": statistics.median(values),
                      "s_min": min(values), "s_all": values} for name, values in seconds.items()}
    ratio = statistics.median(theirs / ours for ours, theirs in zip(seconds["mmgen"], seconds["diffusers"]))
    return figures, ratio


def machine(device: torch.device) -> dict:
    """Device name, CPU count, threads and library versions, for the results file."""
    import diffusers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = models[0] if models else platform.processor()
    return {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--attention-levels", type=int, nargs="+", default=[0, 1, 1], help="1 = attention, per level")
    parser.add_argument("--blocks-per-level", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width (64 for the GPU variant)")
    parser.add_argument("--tokens", type=int, default=16, help="context tokens")
    parser.add_argument("--context-dim", type=int, default=128)
    parser.add_argument("--pooled-dim", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per model and measurement (default: 10 training steps, 3 sampling runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 runs under autocast, the weights stay float32")
    parser.add_argument("--gelu-feedforward", action="store_true",
                        help="give diffusers' transformers a GELU MLP like mmgen's instead of GEGLU")
    parser.add_argument("--quick", action="store_true", help="a tiny shape and few repeats; writes no results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.base_channels, args.groups, args.size, args.tokens = 16, 8, 16, 4
        args.context_dim = args.pooled_dim = 32
        args.train_batch, args.sample_batch, args.sampling_steps = 4, 2, 5
    args.train_repeats = args.repeats or (2 if args.quick else 10)
    args.sample_repeats = args.repeats or (1 if args.quick else 3)
    return args


def check_outputs(forwards: dict, x: torch.Tensor, t: torch.Tensor, autocast) -> None:
    """Both models map x to a finite (batch, 3, H, W) prediction; their norms are printed (neither stuck at zero)."""
    with torch.no_grad(), autocast():
        for name, forward in forwards.items():
            output = forward(x, t)
            assert output.shape == (x.shape[0], 3, *x.shape[2:]), f"{name} output shape {tuple(output.shape)}"
            assert torch.isfinite(output).all(), f"{name} output is not finite"
            print(f"{name:>9} output norm {output.float().norm():8.2f}   (input norm {x.norm():.2f})")


def main() -> None:
    args = parse_arguments()
    load_at_start = os.getloadavg()  # other jobs on the machine show here: compare with cpu_count
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    config = UNetConfig(base_channels=args.base_channels, channel_multipliers=tuple(args.multipliers),
                        attention_levels=tuple(bool(level) for level in args.attention_levels),
                        blocks_per_level=args.blocks_per_level, num_heads=args.heads, groups=args.groups,
                        context_dim=args.context_dim, pooled_dim=args.pooled_dim, dropout=0.0)
    torch.manual_seed(0)
    ours, theirs = mmgen_unet(config).to(device), diffusers_unet(config, args.gelu_feedforward).to(device)
    models = {"mmgen": ours, "diffusers": theirs}
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    print(f"parameters: mmgen {parameters['mmgen']:,}, diffusers {parameters['diffusers']:,}")
    shape = (args.tokens, args.context_dim, args.pooled_dim, device)

    # training: forward, MSE, backward, AdamW on one fixed batch
    x, t, context, padding, pooled = random_inputs(args.train_batch, args.size, *shape)
    forwards = forward_functions(ours, theirs, context, padding, pooled)
    check_outputs(forwards, x, t, autocast)
    target = torch.randn_like(x)
    steps = {name: training_step(models[name].train(), forward, x, t, target, autocast)
             for name, forward in forwards.items()}
    warmups = {name: (lambda step=step: [step() for _ in range(2)]) for name, step in steps.items()}
    train_seconds = interleaved_seconds(steps, args.train_repeats, warmups, device)

    # sampling: each library's DDIM loop from the same noise and conditioning; two network calls warm up
    noise, t, context, padding, pooled = random_inputs(args.sample_batch, args.size, *shape, seed=1)
    forwards = forward_functions(ours.eval(), theirs.eval(), context, padding, pooled)
    samplers = {"mmgen": mmgen_sampling(forwards["mmgen"], noise, args.sampling_steps, autocast),
                "diffusers": diffusers_sampling(forwards["diffusers"], noise, args.sampling_steps, autocast)}
    warmups = {name: (lambda one={name: forward}: check_outputs(one, noise, t, autocast))
               for name, forward in forwards.items()}
    sample_seconds = interleaved_seconds(samplers, args.sample_repeats, warmups, device)

    train_figures, train_ratio = summarise(train_seconds, args.train_batch)
    sample_figures, sample_ratio = summarise(sample_seconds, args.sample_batch)
    print(f"\n{'':32}{'mmgen':>9}{'diffusers':>11}{'mmgen/diffusers':>17}")
    print(f"{'training step, samples/s':32}{train_figures['mmgen']['per_s']:>9.2f}"
          f"{train_figures['diffusers']['per_s']:>11.2f}{train_ratio:>17.2f}")
    print(f"{f'DDIM-{args.sampling_steps} sampling, images/s':32}{sample_figures['mmgen']['per_s']:>9.3f}"
          f"{sample_figures['diffusers']['per_s']:>11.3f}{sample_ratio:>17.2f}")
    print("(throughput from median times; ratio = median over repeats of the paired mmgen/diffusers ratio)")

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/diffusion.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(device), "load_average_1_5_15_min": {"start": load_at_start, "end": os.getloadavg()}},
        "config": {"unet": asdict(config), "size": args.size, "tokens": args.tokens, "dtype": args.dtype,
                   "diffusers_feedforward": "gelu" if args.gelu_feedforward else "geglu",
                   "train_batch": args.train_batch, "sample_batch": args.sample_batch,
                   "sampling_steps": args.sampling_steps, "train_repeats": args.train_repeats,
                   "sample_repeats": args.sample_repeats},
        "parameters": parameters,
        "training": {"samples_per_s": {name: f["per_s"] for name, f in train_figures.items()},
                     "step_s": train_figures},
        "sampling": {"images_per_s": {name: f["per_s"] for name, f in sample_figures.items()},
                     "run_s": sample_figures},
        "ratios_mmgen_over_diffusers": {"training": train_ratio, "sampling": sample_ratio},
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
