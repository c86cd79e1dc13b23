"""Fine-tuning measurements: trainable fraction and peak memory of full vs LoRA vs QLoRA on the same model, and the
before/after figures of the three fine-tuning configs (configs/finetune-*.yaml) on their trained bases.

    python bench/finetune.py memory --kind lm            # random model of the recipe's shape; or --base RUN
    python bench/finetune.py lm --base runs/shakespeare-char [--steps 500] [--text FILE]
    python bench/finetune.py clip --base runs/clip-shapes
    python bench/finetune.py diffusion --base runs/diffusion-shapes [--prompts 64]

memory runs each method in its own process (peak RSS only grows within a process): the model, AdamW over what is
trainable, `--steps` training steps on a random batch of the recipe's size; peak RSS (and max allocated CUDA memory
with --device cuda) and, for qlora, the 4-bit base weights' bytes against their fp32 size (the aim: <= 30%).
lm fine-tunes with method lora and method full for the same steps and compares their loss on the held-out text
(every window of the last 10%). clip: zero-shot top-1 on held-out images of the new shape's classes before and after
(the aim: +30 points with <= 5% trainable). diffusion: prompt fidelity (the judge of bench/judge.py, extended with
the new shape) on new-shape prompts after (aim >= 70%) and on the old held-out prompts before and after (aim: a drop
of at most 10 points). Results: bench/results/finetune-<part>.json; record them in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
CONFIGS = REPOSITORY / "configs"
METHODS = ("full", "lora", "qlora")
TARGETS = {"lm": ["attn", "mlp"], "clip": ["attn", "mlp"], "diffusion": ["attn", "mlp", "conv"]}
RECIPE_CONFIGS = {"lm": "lm-shakespeare-char.yaml", "clip": "clip-shapes.yaml", "diffusion": "diffusion-shapes.yaml"}
NEW_SHAPE = "heart"


def finetune(kind: str, base: str, out: Path, overrides: list[str]) -> float:
    """Run `mmgen finetune KIND` with its configs/finetune-KIND-*-lora.yaml; returns the wall time."""
    config = next(CONFIGS.glob(f"finetune-{kind}-*-lora.yaml"))
    command = [sys.executable, "-m", "mmgen.cli", "finetune", kind, "--base", base, "--config", str(config),
               "--out", str(out), "train.progress=false", *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


# ---------------------------------------------------------------- memory
def random_model(kind: str):
    """A random model of the recipe config's shape (what the memory figures need; no trained base required)."""
    from mmgen.clip import CLIP, CLIPConfig
    from mmgen.config import from_dict, load_yaml
    from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
    from mmgen.text import GPT, GPTConfig

    section = load_yaml(CONFIGS / RECIPE_CONFIGS[kind])["model"]
    if kind == "lm":
        return GPT(from_dict(GPTConfig, {**section, "vocab_size": 65}, "model."))
    if kind == "clip":
        return CLIP(from_dict(CLIPConfig, section, "model."))
    clip = CLIP(from_dict(CLIPConfig, load_yaml(CONFIGS / RECIPE_CONFIGS["clip"])["model"], "clip."))
    return TextToImage.from_text_encoder(clip, section["image_size"], from_dict(UNetConfig, section["unet"], "unet."),
                                         from_dict(NoiseSchedule, section["schedule"], "schedule."))


def training_step(kind: str, model, batch_size: int, device: str):
    """A `() -> loss` closure over one random batch of the recipe's shape, with the recipe's loss."""
    from mmgen.diffusion.text2img import tokenize_prompts

    generator = torch.Generator().manual_seed(0)
    if kind == "lm":
        from mmgen.recipes.lm import next_token_loss

        tokens = torch.randint(0, model.config.vocab_size, (batch_size, model.config.context_length + 1),
                               generator=generator).to(device)
        return lambda: next_token_loss(model, tokens)
    captions = ["a large red circle in the center", "a small blue star at the top left"] * (batch_size // 2)
    batch = {"captions": captions, "skipped": 0, "skipped_examples": []}
    if kind == "clip":
        from mmgen.clip.objective import ContrastiveObjective

        size = model.config.vision.image_size
        batch.update(images=torch.randn(len(captions), 3, size, size, generator=generator).to(device),
                     tokens=tokenize_prompts(captions, model.config.text.context_length).to(device))
        loss = ContrastiveObjective("infonce")
        return lambda: loss(model, batch)[0]
    from mmgen.diffusion.objective import DenoisingLoss, DiffusionLossConfig

    size = model.config.image_size
    batch.update(images=torch.randn(len(captions), 3, size, size, generator=generator).to(device),
                 tokens=tokenize_prompts(captions, model.context_length).to(device))
    loss = DenoisingLoss(model, DiffusionLossConfig())
    return lambda: loss(model, batch)[0]


def memory_child(args) -> None:
    """One method in this process: print {"trainable", "total", "peak_rss_mib", ...} as JSON."""
    from mmgen import load
    from mmgen.finetune import LoRAConfig, add_lora, parameter_counts, quantized_weight_bytes
    from mmgen.training.optim import make_optimizer

    def peak_rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    importlib.import_module("peft")  # every method pays the same imports before the baseline

    if args.method == "qlora":
        from mmgen.finetune import require_bitsandbytes

        require_bitsandbytes()
    before_model = peak_rss_mib()
    torch.manual_seed(0)
    model = load(args.base) if args.base else random_model(args.kind)
    if args.method != "full":
        add_lora(model, LoRAConfig(method=args.method, rank=args.rank, alpha=2 * args.rank, targets=TARGETS[args.kind]))
    model.to(args.device).train()
    trainable, total = parameter_counts(model)
    optimizer = make_optimizer(model, 1e-4, 0.0, (0.9, 0.99))
    step = training_step(args.kind, model, args.batch_size, args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"method": args.method, "trainable": trainable, "total": total, "trainable_fraction": trainable / total,
              "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_model_mib": round(before_model, 1),
              "peak_above_imports_mib": round(peak_rss_mib() - before_model, 1),
              "seconds_per_step": round((time.perf_counter() - start) / args.steps, 4)}
    if args.method == "qlora":
        stored, as_fp32 = quantized_weight_bytes(model)
        result.update(quantized_bytes=stored, quantized_fp32_bytes=as_fp32, quantized_share=stored / as_fp32)
    if args.device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))


def memory(args) -> dict:
    rows = []
    for method in METHODS:
        command = [sys.executable, __file__, "memory-child", "--kind", args.kind, "--method", method, "--steps",
                   str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--device",
                   args.device] + (["--base", args.base] if args.base else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{args.kind} {method}: {rows[-1]}", file=sys.stderr)
    return {"kind": args.kind, "base": args.base or f"random, shaped as configs/{RECIPE_CONFIGS[args.kind]}",
            "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank, "device": args.device,
            "methods": rows}


# ---------------------------------------------------------------- before / after
def lm(args) -> dict:
    """Held-out loss of the base, of LoRA and of full fine-tuning after the same number of steps."""
    from lm_shakespeare import full_validation_loss

    from mmgen import load
    from mmgen.data.text import read_corpus
    from mmgen.finetune import load_adapter
    from mmgen.hub import resolve_model_folder
    from mmgen.text.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_folder(args.base))
    text = read_corpus(args.text)
    tokens = torch.tensor(tokenizer.encode(text[int(len(text) * 0.9):]), dtype=torch.long)
    data = ["data.path=" + (str(args.text) if args.text else "null")]
    results = {"base_run": args.base, "steps": args.steps, "text": str(args.text or "Tiny Shakespeare")}
    with tempfile.TemporaryDirectory() as scratch:
        for method, lr in (("lora", None), ("full", args.full_lr)):
            overrides = [f"method={method}", f"train.max_steps={args.steps}", "train.checkpoint_every=0", *data]
            wall = finetune("lm", args.base, Path(scratch) / method, overrides + ([f"train.lr={lr}"] if lr else []))
            results[method] = {"wall_s": round(wall, 1)}
        models = {"base": load(args.base), "lora": load_adapter(load(args.base), Path(scratch) / "lora"),
                  "full": load(Path(scratch) / "full")}
        context = models["base"].config.context_length
        for name, model in models.items():
            results.setdefault(name, {})["held_out_loss"] = round(full_validation_loss(model, tokens, context), 4)
    return results


def clip(args) -> dict:
    """Zero-shot accuracy on held-out images of the new shape's classes, before and after the LoRA run."""
    from mmgen import load
    from mmgen.finetune import load_adapter, trainable_fraction
    from mmgen.recipes.clip_eval import evaluate

    def figures(adapter=None) -> dict:
        return evaluate(args.base, zeroshot=f"shapes:extra={NEW_SHAPE}", max_samples=args.samples, adapter=adapter)

    results = {"base": args.base, "before": figures()}
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        results["wall_s"] = round(finetune("clip", args.base, run, args.overrides), 1)
        results["after"] = figures(run)
        results["trainable_fraction"] = trainable_fraction(load_adapter(load(args.base), run))
    results["new_top1_rise_points"] = 100 * (results["after"]["zeroshot/new_top1"]
                                             - results["before"]["zeroshot/new_top1"])
    return results


def diffusion(args) -> dict:
    """Judge-read prompt fidelity: new-shape prompts after; the old held-out prompts before and after."""
    from diffusion_fidelity import generate, prompt_attributes
    from judge import load_or_train_judge, score

    from mmgen.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, caption
    from mmgen.finetune import load_adapter
    from mmgen.pipelines.text2img import TextToImagePipeline

    judge = load_or_train_judge(32, shapes=SHAPES + (NEW_SHAPE,))
    rng = np.random.default_rng(args.seed)
    new = [{"shape": NEW_SHAPE, "colour": rng.choice(COLOURS), "size": rng.choice(SIZES),
            "position": rng.choice(POSITIONS)} for _ in range(args.prompts)]
    prompt_sets = {"new_shape": [{k: str(v) for k, v in a.items()} for a in new],
                   "old_heldout": prompt_attributes("heldout", args.prompts, args.seed)}
    setting = {"sampler": "ddim", "steps": 50, "guidance_scale": args.guidance}

    def fidelity(pipeline, attributes) -> dict:
        images = generate(pipeline, [caption(a) for a in attributes], setting, 1, 64, args.seed)
        return score(judge.predict(images), attributes)

    base = TextToImagePipeline.from_pretrained(args.base, device=args.device)
    results = {"base": args.base, "setting": setting, "judge": judge.report,
               "before": {name: fidelity(base, attributes) for name, attributes in prompt_sets.items()}}
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        results["wall_s"] = round(finetune("diffusion", args.base, run, args.overrides), 1)
        load_adapter(base.model, run)
        results["after"] = {name: fidelity(base, attributes) for name, attributes in prompt_sets.items()}
    results["old_drop_points"] = 100 * (results["before"]["old_heldout"]["shape+colour"]
                                        - results["after"]["old_heldout"]["shape+colour"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    for name in ("memory", "memory-child"):
        part = parts.add_parser(name)
        part.add_argument("--kind", choices=tuple(TARGETS), default="lm")
        part.add_argument("--base", help="a trained run or model folder (default: a random model of the recipe's shape)")
        part.add_argument("--steps", type=int, default=10)
        part.add_argument("--batch-size", type=int, default=16)
        part.add_argument("--rank", type=int, default=8)
        part.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if name == "memory-child":
            part.add_argument("--method", choices=METHODS, required=True)
    part = parts.add_parser("lm")
    part.add_argument("--base", default="runs/shakespeare-char")
    part.add_argument("--steps", type=int, default=500)
    part.add_argument("--full-lr", type=float, default=3e-4, help="full fine-tuning's lr (LoRA uses the config's)")
    part.add_argument("--text", type=Path, help="held-out text to adapt to (default: Tiny Shakespeare's last 10%%)")
    for name, default in (("clip", "runs/clip-shapes"), ("diffusion", "runs/diffusion-shapes")):
        part = parts.add_parser(name)
        part.add_argument("--base", default=default)
        part.add_argument("--samples", type=int, default=1000, help="held-out images (clip)")
        part.add_argument("--prompts", type=int, default=64, help="prompts per set (diffusion)")
        part.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance (diffusion; DDIM 50)")
        part.add_argument("--seed", type=int, default=0)
        part.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        part.add_argument("overrides", nargs="*", help="overrides of the fine-tuning config")
    args = parser.parse_args()
    if args.part == "memory-child":
        return memory_child(args)
    results = {"memory": memory, "lm": lm, "clip": clip, "diffusion": diffusion}[args.part](args)
    results.update(date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(sys.argv))
    text = json.dumps(results, indent=2, default=float)
    print(text)
    out = RESULTS / f"finetune-{args.part}{'-' + args.kind if args.part == 'memory' else ''}.json"
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
