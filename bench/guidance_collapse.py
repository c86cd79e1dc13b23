"""Why classifier-free guidance collapsed (issue 19): text-to-image runs on a real captioned set (scikit-learn's
digits, written by bench/real_data.py or any labelled folder data/digits/{train,val}/CLASS/*.png), sampled with each
sampler variant at guidance 1, 1.5, 3, 5, 7.5 and judged by an independent CNN trained here on the real training
images only. Prints one JSON line per (run, weights, sampler, guidance) and writes OUT/results.jsonl, OUT/diag.json
(per-step conditional-unconditional gap, guided epsilon RMS and share of clipped x0 values) and OUT/grid_A.png.

The runs (docs/benchmarks.md, "Why guidance collapsed"; ~10 min on one H200 for all four, ~1 h each on 2 CPU cores):
  T='["a handwritten digit {}.", "the number {}.", "a drawing of the digit {}."]'; D=data/digits
  mmgen train clip --config configs/clip-shapes.yaml --out runs/digits-clip data.train=$D/train data.val=$D/val \
      data.zeroshot=$D/val data.retrieval=$D/val "data.templates=$T" "data.zeroshot_templates=$T" data.hard_negatives=1
  mmgen train diffusion --out runs/digits-A --config configs/diffusion-shapes.yaml model.text_encoder=runs/digits-clip \
      data.train=$D/train data.val=$D/val "data.templates=$T"          # B: loss.caption_dropout=0.2,
      # C: model.schedule.prediction_type=v_prediction, D: loss.min_snr_gamma=null
  python bench/guidance_collapse.py OUT runs/digits-A [runs/digits-B ...]   (DATA=data/digits by default)
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from mmgen.diffusion.guidance import Conditioned, classifier_free_guidance
from mmgen.diffusion.samplers import DDIMSampler, DDPMSampler, dynamic_threshold, sample_loop
from mmgen.diffusion.text2img import TextToImage, tokenize_prompts
from mmgen.hub import load_as

OUT = Path(sys.argv[1]); RUNS = sys.argv[2:]
dev = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = "zero one two three four five six seven eight nine".split()
PER_CLASS = int(os.environ.get("PER_CLASS", "20"))
DATA = os.environ.get("DATA", "data/digits")

def load_folder(split):
    xs, ys = [], []
    for label, n in enumerate(NAMES):
        for p in sorted(Path(DATA, split, n).glob("*.png")):
            xs.append(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 127.5 - 1); ys.append(label)
    return torch.tensor(np.stack(xs))[:, None], torch.tensor(ys)

def train_judge():
    torch.manual_seed(0)
    x, y = load_folder("train"); xv, yv = load_folder("val")
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, 10)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    x, y = x.to(dev), y.to(dev)
    for epoch in range(int(os.environ.get("JUDGE_EPOCHS", "40"))):
        perm = torch.randperm(len(x), device=dev)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]; xb = x[idx]
            shift = torch.randint(-2, 3, (2,)).tolist(); xb = torch.roll(xb, shift, (2, 3))
            loss = F.cross_entropy(net(xb), y[idx]); opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xv.to(dev)).argmax(1).cpu() == yv).float().mean().item()
    return net, acc

class ThresholdedDDIM(DDIMSampler):
    """DDIM with Imagen's dynamic thresholding (no upper bound on s to speak of) and epsilon from the processed x0."""
    def __init__(self, schedule, threshold=False, **kw):
        super().__init__(schedule, **kw); self.threshold = threshold
    def step(self, model_output, t, x_t, generator=None, noise=None):
        t = int(t); prev = self.previous_timestep(t)
        ab = self.schedule.alphas_cumprod[t]
        abp = self.schedule.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0 = self.schedule.predict_x0(model_output, x_t, t)
        x0 = dynamic_threshold(x0, 0.995, 10.0) if self.threshold else x0.clamp(-1, 1)
        eps = (x_t - ab ** 0.5 * x0) / (1 - ab) ** 0.5
        return abp ** 0.5 * x0 + (1 - abp) ** 0.5 * eps

def make_sampler(kind, schedule):
    if kind == "ddim_thresh":
        s = ThresholdedDDIM(schedule, threshold=True, timestep_spacing="trailing")
        s.set_timesteps(25)
    elif kind.startswith("ddim"):  # "ddim": diffusers' default, epsilon from the unclipped output (mmgen before)
        s = DDIMSampler(schedule, clip_sample=True, timestep_spacing="trailing",
                        use_clipped_model_output=kind == "ddim_cleaneps")
        s.set_timesteps(25)
    else:
        s = DDPMSampler(schedule, clip_sample=True, timestep_spacing="trailing"); s.set_timesteps(100)
    return s

DIAG = {}
def sample(model, kind, scale, seed=0, diag_key=None):
    prompts = [f"a handwritten digit {n}." for n in NAMES for _ in range(PER_CLASS)]
    tokens = tokenize_prompts(prompts, model.context_length).to(dev)
    cond = Conditioned(model.denoise, model.encode_condition(tokens))
    null = Conditioned(model.denoise, model.null_condition(len(tokens), dev))
    opts = {}
    if kind == "ddim_interval": opts["interval"] = (0, 400)
    if kind == "ddim_rescale": opts["rescale"] = 0.7
    fn = classifier_free_guidance(cond, null, scale, **opts)
    sampler = make_sampler(kind, model.schedule)
    if diag_key:
        rows = []
        def fn2(x, t, fn=fn):
            c, u = cond(x, t), null(x, t)
            g = u + scale * (c - u)
            x0 = model.schedule.predict_x0(g, x, t)
            eps = model.schedule.predict_epsilon(g, x, t)
            rows.append({"t": int(t[0]), "gap_rms": (c - u).pow(2).mean().sqrt().item(),
                         "eps_guided_rms": eps.pow(2).mean().sqrt().item(), "x0_absmax_mean": x0.flatten(1).abs().amax(1).mean().item(),
                         "x0_clipped_frac": (x0.abs() > 1).float().mean().item(), "x_rms": x.pow(2).mean().sqrt().item()})
            return g
        use = fn2
    else:
        use = fn
    g = torch.Generator(dev).manual_seed(seed)
    x = sample_loop(use, sampler, (len(tokens), *model.config.sample_shape), generator=g, progress=False, device=dev)
    if diag_key: DIAG[diag_key] = rows
    return x.clamp(-1, 1).mean(1, keepdim=True)  # grey

def main():
    t0 = time.time()
    judge, judge_acc = train_judge()
    print(f"judge val acc {judge_acc:.4f} ({time.time()-t0:.0f}s)", flush=True)
    res = open(OUT / "results.jsonl", "a")
    res.write(json.dumps({"judge_val_acc": judge_acc}) + "\n")
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    grids = []
    for run in RUNS:
        name = Path(run).name
        variants = [("ema", None)]
        ckpts = sorted(Path(run, "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
        if name.endswith("A") and ckpts: variants.append(("raw", ckpts[-1] / "model.safetensors"))
        for wname, wpath in variants:
            model = load_as(run, TextToImage, map_location=dev).eval()
            if wpath is not None:
                from safetensors.torch import load_file
                sd = load_file(str(wpath)); model.load_state_dict(sd, strict=False)
            kinds = ["ddim", "ddim_cleaneps", "ddim_thresh", "ddpm", "ddim_interval", "ddim_rescale"] if wname == "ema" else ["ddim", "ddim_cleaneps"]
            for kind in kinds:
                for scale in (1.0, 1.5, 3.0, 5.0, 7.5):
                    dk = f"{name}/{wname}/{kind}/{scale}" if (name.endswith("A") and wname == "ema" and kind in ("ddim", "ddim_cleaneps") and scale in (1.5, 3.0, 7.5)) else None
                    with torch.no_grad():
                        imgs = sample(model, kind, scale, diag_key=dk)
                        pred = judge(imgs).argmax(1).cpu()
                    per = [(pred[labels == c] == c).float().mean().item() for c in range(10)]
                    fid = (pred == labels).float().mean().item()
                    line = {"run": name, "weights": wname, "sampler": kind, "guidance": scale, "fidelity": round(fid, 4),
                            "per_class": [round(p, 2) for p in per], "pixel_std": round(imgs.std().item(), 3),
                            "elapsed": round(time.time() - t0)}
                    print(json.dumps(line), flush=True); res.write(json.dumps(line) + "\n"); res.flush()
                    if name.endswith("A") and wname == "ema" and kind in ("ddim", "ddim_cleaneps", "ddim_thresh") and scale in (1.5, 3.0, 7.5):
                        grids.append(imgs.view(10, PER_CLASS, 1, 32, 32)[:, :4].reshape(40, 1, 32, 32))
            json.dump(DIAG, open(OUT / "diag.json", "w"))
    if grids:
        import torchvision
        torchvision.utils.save_image(torch.cat(grids).cpu() * 0.5 + 0.5, OUT / "grid_A.png", nrow=40)


if __name__ == "__main__":
    main()
