"""Stable Diffusion 1.x / 2.x diffusers folders <-> mmgen latent text-to-image folders (TextToImage with a VAE).

A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) becomes one self-contained
mmgen folder that `mmgen sample text2img` and TextToImagePipeline use unchanged: the UNet in SD's layout
(unet_interop), the VAE (vae_interop), the CLIP text encoder alone (hf_clip_interop) re-padding its tokens as SD's
tokenizer pads them, the text states unmasked and no pooled embedding (as SD feeds them), and the scheduler's noise
schedule (betas, prediction type, zero terminal SNR). The scheduler's inference options (timestep_spacing,
steps_offset; clip_sample, clip_sample_range and set_alpha_to_one, which SD's folders set false; Imagen's dynamic
thresholding: thresholding, dynamic_thresholding_ratio, sample_max_value) become the model's default sampling
(config.json), so TextToImagePipeline and `mmgen sample text2img` visit the timesteps diffusers' DDIM / DPM-Solver
schedulers of that folder visit and process x0 and take DDIM's steps as StableDiffusionPipeline steps its DDIMScheduler
(the network's epsilon kept: use_clipped_model_output false); the export writes them back.
A clip_sample true is turned off (with a warning), as StableDiffusionPipeline turns it off when it loads the folder.
Refused with a UserError naming the part: SDXL (two text encoders, added conditions), ControlNets and other UNet
classes, a tokenizer whose vocabulary is not CLIP's BPE, a missing component.
"""

from __future__ import annotations

import inspect
import json
import math
import tempfile
import warnings
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from ..clip.hf_clip_interop import from_hf_clip, load_hf_clip, to_hf_clip
from ..clip.model import CLIP
from ..errors import CheckpointError, UserError
from ..io import atomic_folder, read_json
from .samplers import SPACINGS
from .schedule import NoiseSchedule
from .text2img import TextToImage, TextToImageConfig
from .unet_interop import to_diffusers_unet, unet_config_from_diffusers, unet_state_from_diffusers
from .vae_interop import from_diffusers_vae, to_diffusers_vae

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SPECIAL_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's -> HF's
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@lru_cache(maxsize=1)
def clip_bpe_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's BPE (the one mmgen's CLIPTokenizer uses) as transformers writes it: token -> id, and the merges."""
    from ..clip.tokenizer import _simple_tokenizer

    bpe = _simple_tokenizer()
    vocabulary = {_SPECIAL_NAMES.get(token, token): index for token, index in bpe.encoder.items()}
    return vocabulary, tuple(sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))


def write_clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of CLIP's BPE in `folder` (what a transformers CLIPTokenizer is built from)."""
    vocabulary, merges = clip_bpe_vocabulary()
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocabulary, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_file, merges_file


def _check_pipeline_folder(folder: Path) -> None:
    """UserError / CheckpointError naming what makes `folder` no SD 1.x / 2.x diffusers folder."""
    if not folder.is_dir():
        raise CheckpointError(f"Stable Diffusion folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(folder / "model_index.json")
    class_name = index.get("_class_name", "?")
    if "text_encoder_2" in index or "XL" in class_name:
        raise UserError(f"{folder} holds {class_name} (SDXL: two text encoders and added conditions); "
                        "only Stable Diffusion 1.x / 2.x convert")
    if "controlnet" in index or "ControlNet" in class_name:
        raise UserError(f"{folder} holds a ControlNet pipeline ({class_name}); only Stable Diffusion 1.x / 2.x "
                        "convert")
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise UserError(f"{folder} has no {missing[0]}/ folder: a Stable Diffusion folder needs "
                        f"{', '.join(name + '/' for name in COMPONENTS)}")
    unet_meta = read_json(folder / "unet" / "config.json")
    if unet_meta.get("_class_name") != "UNet2DConditionModel":
        raise UserError(f"{folder}/unet holds a {unet_meta.get('_class_name')}, not a UNet2DConditionModel")
    unet_config_from_diffusers(unet_meta)  # an unsupported UNet is refused before any weights are read


def noise_schedule_from_scheduler(config: dict) -> NoiseSchedule:
    """mmgen's NoiseSchedule of a diffusers scheduler config (scheduler_config.json); UserError if unsupported."""
    problems = []
    if config.get("trained_betas") is not None:
        problems.append("explicit trained_betas")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in _BETA_SCHEDULES:
        problems.append(f"beta_schedule {beta_schedule!r} (only {', '.join(_BETA_SCHEDULES)})")
    if problems:
        raise UserError("this scheduler's noise schedule cannot be expressed: " + "; ".join(problems))
    try:
        return NoiseSchedule(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_schedule=beta_schedule,
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            prediction_type=config.get("prediction_type", "epsilon"),
            rescale_zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )
    except ValueError as error:
        raise UserError(f"this scheduler's noise schedule cannot be expressed: {error}") from None


def _class_defaults(config: dict) -> dict:
    """The constructor defaults of the diffusers scheduler class a scheduler config names (DDIMScheduler's when it
    names none diffusers has)."""
    import diffusers

    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if not (inspect.isclass(scheduler_class) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        scheduler_class = diffusers.DDIMScheduler
    parameters = inspect.signature(scheduler_class).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters if parameter.default is not parameter.empty}


def spacing_from_scheduler(config: dict) -> tuple[str, int]:
    """(timestep_spacing, steps_offset) a diffusers scheduler config samples with: its keys, else its class's defaults
    (DDIM's and PNDM's "leading", DPM-Solver's "linspace"); UserError for a spacing mmgen's samplers lack."""
    spacing = config.get("timestep_spacing", _class_defaults(config).get("timestep_spacing", "leading"))
    offset = config.get("steps_offset", 0)
    if spacing not in SPACINGS:
        raise UserError(f"the scheduler's timestep_spacing {spacing!r} is not one mmgen samples with "
                        f"({', '.join(SPACINGS)})")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise UserError(f"the scheduler's steps_offset {offset!r} is not an integer >= 0")
    return spacing, offset


def x0_options_from_scheduler(config: dict) -> tuple[bool, float, bool]:
    """(clip_sample, clip_sample_range, set_alpha_to_one) a diffusers scheduler config samples with: its keys, else
    its class's defaults (DDIM's: True, 1.0, True; PNDM's set_alpha_to_one: False); a class without the option does not
    clip x0 (PNDM, DPM-Solver, Euler) and ends on the clean sample (DPM-Solver's and Euler's last sigma is 0).
    UserError for a value of the wrong type."""
    defaults = _class_defaults(config)
    clip_sample = config.get("clip_sample", defaults.get("clip_sample", False))
    clip_sample_range = config.get("clip_sample_range", defaults.get("clip_sample_range", 1.0))
    set_alpha_to_one = config.get("set_alpha_to_one", defaults.get("set_alpha_to_one", True))
    for name, value in (("clip_sample", clip_sample), ("set_alpha_to_one", set_alpha_to_one)):
        if not isinstance(value, bool):
            raise UserError(f"the scheduler's {name} {value!r} is not true or false")
    if isinstance(clip_sample_range, bool) or not isinstance(clip_sample_range, (int, float)) or not (
            math.isfinite(clip_sample_range) and clip_sample_range > 0):
        raise UserError(f"the scheduler's clip_sample_range {clip_sample_range!r} is not a positive number")
    return clip_sample, float(clip_sample_range), set_alpha_to_one


def thresholding_from_scheduler(config: dict) -> tuple[bool, float, float]:
    """(thresholding, dynamic_thresholding_ratio, sample_max_value) a diffusers scheduler config samples with: its keys,
    else its class's defaults (DDIM's, DDPM's, DPM-Solver's: False, 0.995, 1.0); a class without the option (PNDM,
    Euler) does not threshold. With thresholding false the other two mean nothing and are not read (the defaults).
    UserError for a value of the wrong type or out of range."""
    defaults = _class_defaults(config)
    thresholding = config.get("thresholding", defaults.get("thresholding", False))
    if not isinstance(thresholding, bool):
        raise UserError(f"the scheduler's thresholding {thresholding!r} is not true or false")
    if not thresholding:
        return False, 0.995, 1.0
    ratio = config.get("dynamic_thresholding_ratio", defaults.get("dynamic_thresholding_ratio", 0.995))
    max_value = config.get("sample_max_value", defaults.get("sample_max_value", 1.0))
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UserError(f"the scheduler's dynamic_thresholding_ratio {ratio!r} is not a number in (0, 1]")
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not (
            math.isfinite(max_value) and max_value >= 1):
        raise UserError(f"the scheduler's sample_max_value {max_value!r} is not a finite number >= 1")
    return True, float(ratio), float(max_value)


def _tokenizer_padding(folder: Path, context_length: int) -> int:
    """The id SD's tokenizer pads with, after checking its vocabulary is CLIP's BPE and its length the encoder's."""
    import transformers

    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{folder}: cannot read it as a CLIP tokenizer ({detail})") from None
    if tokenizer.get_vocab() != clip_bpe_vocabulary()[0]:
        raise UserError(f"{folder}: the tokenizer's vocabulary is not CLIP's BPE, the only one mmgen tokenizes with")
    if tokenizer.model_max_length != context_length:
        raise UserError(f"{folder}: the tokenizer's model_max_length {tokenizer.model_max_length} differs from the "
                        f"text encoder's {context_length} positions")
    if tokenizer.pad_token_id is None:
        raise UserError(f"{folder}: the tokenizer has no pad token")
    return tokenizer.pad_token_id


def from_stable_diffusion(folder: str | Path) -> TextToImage:
    """An mmgen latent TextToImage (float32, on the CPU, eval mode) from a local diffusers SD 1.x / 2.x folder."""
    from diffusers import UNet2DConditionModel

    from .vae_interop import load_diffusers_vae

    folder = Path(folder)
    _check_pipeline_folder(folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise UserError(f"{folder}/scheduler has no scheduler_config.json")
    scheduler_config = read_json(scheduler_file)
    schedule = noise_schedule_from_scheduler(scheduler_config)
    timestep_spacing, steps_offset = spacing_from_scheduler(scheduler_config)
    clip_sample, clip_sample_range, set_alpha_to_one = x0_options_from_scheduler(scheduler_config)
    thresholding, dynamic_thresholding_ratio, sample_max_value = thresholding_from_scheduler(scheduler_config)
    if clip_sample:  # StableDiffusionPipeline.__init__ rewrites it to false: the folder's own images never clip
        warnings.warn(f"{scheduler_file} says clip_sample true, which StableDiffusionPipeline turns off (an outdated "
                      "config, says diffusers); the converted model samples without clipping too", stacklevel=2)
        clip_sample = False
    if steps_offset != 1:  # StableDiffusionPipeline.__init__ rewrites it to 1 too (an outdated config, says diffusers)
        warnings.warn(f"{scheduler_file} says steps_offset {steps_offset}, which StableDiffusionPipeline makes 1; the "
                      "converted model samples with 1 too", stacklevel=2)
        steps_offset = 1
    text_encoder = load_hf_clip(folder / "text_encoder")
    pad_token_id = _tokenizer_padding(folder / "tokenizer", text_encoder.config.max_position_embeddings)
    vae = load_diffusers_vae(folder / "vae")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{folder}/unet: cannot load it as diffusers' UNet2DConditionModel ({detail})") from None
    return from_diffusers_parts(unet, vae, text_encoder, pad_token_id, schedule, timestep_spacing=timestep_spacing,
                                steps_offset=steps_offset, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                                set_alpha_to_one=set_alpha_to_one, thresholding=thresholding,
                                dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                sample_max_value=sample_max_value, use_clipped_model_output=False)


def from_diffusers_parts(unet, vae, text_encoder, pad_token_id: int, schedule: NoiseSchedule, *,
                         timestep_spacing: str = "trailing", steps_offset: int = 0, clip_sample: bool = True,
                         clip_sample_range: float | None = None, set_alpha_to_one: bool = True,
                         thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                         sample_max_value: float = 1.0, use_clipped_model_output: bool = True) -> TextToImage:
    """An mmgen latent TextToImage (float32, eval mode) from the models of a StableDiffusionPipeline in memory: its
    UNet2DConditionModel, AutoencoderKL, CLIPTextModel, its tokenizer's pad id and the scheduler's noise schedule;
    the keyword options (spacing_from_scheduler, x0_options_from_scheduler and thresholding_from_scheduler of the
    scheduler's config, use_clipped_model_output false as StableDiffusionPipeline steps DDIM; mmgen's defaults
    otherwise) are the model's default sampling."""
    if type(unet).__name__ != "UNet2DConditionModel":
        raise UserError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    unet_config = unet_config_from_diffusers(unet.config)
    clip = from_hf_clip(text_encoder)
    converted_vae = from_diffusers_vae(vae)
    if unet_config.context_dim != clip.config.text.width:
        raise UserError(f"the UNet cross-attends to width {unet_config.context_dim}, the text encoder "
                        f"gives {clip.config.text.width}")
    text_config = replace(clip.config, text=replace(clip.config.text, pad_token_id=pad_token_id))
    config = TextToImageConfig(
        image_size=unet.config.sample_size * converted_vae.config.downsampling_factor,
        unet=unet_config,
        schedule=schedule,
        text_encoder=text_config,
        vae=converted_vae.config,
        mask_text_padding=False,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        set_alpha_to_one=set_alpha_to_one,
        thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
        use_clipped_model_output=use_clipped_model_output,
    )
    model = TextToImage(config)
    model.unet.load_state_dict(unet_state_from_diffusers(unet_config, unet.state_dict()))  # one copy of the UNet
    model.text_encoder.load_state_dict(clip.state_dict())
    model.vae.load_state_dict(converted_vae.state_dict())
    return model.eval()


def convert_stable_diffusion_folder(source: str | Path, out: str | Path) -> TextToImage:
    """Read a local diffusers SD folder and write an mmgen text2img folder (for `mmgen convert stable-diffusion`)."""
    model = from_stable_diffusion(source)
    model.save_pretrained(out)
    return model


def _text_encoder_for_export(model: TextToImage) -> CLIP:
    """The text encoder alone, its last text_skip_layers layers dropped (what SD's clip skip would take)."""
    config = model.config.text_encoder
    layers = config.text.layers - model.config.text_skip_layers
    text_only = replace(config, vision=None, text=replace(config.text, layers=layers, pad_token_id=None))
    clip = CLIP(text_only)
    state = {name: tensor for name, tensor in model.text_encoder.state_dict().items()
             if name in clip.state_dict()}
    clip.load_state_dict(state, strict=True)
    return clip


def export_problems(config: TextToImageConfig) -> list[str]:
    """What of a `config` text2img model SD's pipeline cannot express, beyond its UNet (unet_config_to_diffusers
    names those): one phrase each, none when it can."""
    problems = []
    if config.vae is None:
        problems.append("pixel-space diffusion (SD's pipeline denoises a VAE's latents)")
    if config.mask_text_padding:
        problems.append("masked text padding (SD attends to every text state; needs mask_text_padding: false)")
    if config.unet.pooled_dim is not None:
        problems.append("a pooled text embedding added to the timestep embedding (needs unet.pooled_dim: null)")
    text = config.text_encoder.text
    if text.vocab_size != len(clip_bpe_vocabulary()[0]):
        problems.append(f"a text vocabulary of {text.vocab_size} (SD's tokenizer is CLIP's BPE, 49408)")
    if config.schedule.beta_schedule not in _BETA_SCHEDULES:
        problems.append(f"beta_schedule {config.schedule.beta_schedule!r}")
    return problems


def to_stable_diffusion(model: TextToImage, out: str | Path) -> Path:
    """Write `model` as a diffusers StableDiffusionPipeline folder (atomically): UserError naming every part SD's
    layout cannot express. The scheduler is a DDIMScheduler with the model's default sampling: its timestep spacing
    and steps_offset, set_alpha_to_one, clip_sample_range (the model's sample_range when it names none) and dynamic
    thresholding; clip_sample is false, as StableDiffusionPipeline makes every scheduler's (mmgen's own models clip by
    default: their images from diffusers' DDIM can differ where x0 leaves that range), and StableDiffusionPipeline's
    DDIM keeps the network's epsilon (a model whose use_clipped_model_output is true and that thresholds gives other
    images there)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    problems = export_problems(model.config)
    if model.config.timestep_spacing == "leading" and model.config.steps_offset != 1:
        problems.append(f"'leading' timestep spacing with steps_offset {model.config.steps_offset} "
                        "(StableDiffusionPipeline makes every steps_offset 1)")
    if problems:
        raise UserError("this model cannot be expressed as a Stable Diffusion folder: " + "; ".join(problems))
    unet = to_diffusers_unet(model.unet)  # raises for a UNet layout diffusers lacks
    unet.register_to_config(sample_size=model.config.sample_size)
    text_encoder = to_hf_clip(_text_encoder_for_export(model))
    vae = to_diffusers_vae(model.vae)
    schedule, config = model.config.schedule, model.config
    clip_sample_range = config.clip_sample_range if config.clip_sample_range is not None else model.sample_range
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start, beta_end=schedule.beta_end, prediction_type=schedule.prediction_type,
        rescale_betas_zero_snr=schedule.rescale_zero_terminal_snr, clip_sample=False,
        clip_sample_range=clip_sample_range, set_alpha_to_one=config.set_alpha_to_one,
        thresholding=config.thresholding, dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
        sample_max_value=config.sample_max_value,
        # only "leading" reads steps_offset, and it is 1 then (checked above): the value StableDiffusionPipeline sets
        timestep_spacing=model.config.timestep_spacing, steps_offset=1,
    )
    text = model.config.text_encoder.text
    vocabulary = clip_bpe_vocabulary()[0]
    pad_id = text.pad_token_id if text.pad_token_id is not None else 0  # mmgen's tokenizer pads with 0 ("!")
    pad_token = next(token for token, index in vocabulary.items() if index == pad_id)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = write_clip_bpe_files(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token,
                                  model_max_length=text.context_length)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    with atomic_folder(out) as staging:
        pipeline.save_pretrained(staging)
    return Path(out)
