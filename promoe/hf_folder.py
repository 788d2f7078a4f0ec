"""diffusers folders of promoe models, checked and read without diffusers (`promoe.hf` writes them; `promoe.sample`
and `ProMoEPipeline.from_pretrained` read them through here):

    DIR/model_index.json        {"_class_name": "ProMoEPipeline",
                                 "transformer": ["promoe.hf", "ProMoETransformer2DModel"],
                                 "scheduler": ["diffusers", <a scheduler of SCHEDULER_OBJECTIVES>],
                                 "vae": ["diffusers", "AutoencoderKL"], or [null, null] for a pixel-space model}
    DIR/transformer/config.json every ModelConfig field, beside diffusers' own `_class_name`, `_diffusers_version`
    DIR/transformer/diffusion_pytorch_model.safetensors   the DiT's state dict, each key under "dit."
    DIR/scheduler/scheduler_config.json
    DIR/vae/                    the AutoencoderKL (latent models only)

A folder is local: nothing is downloaded. Its model_index.json names the modules that diffusers imports to load it,
so a folder that names any other class than these is refused before diffusers reads it.
"""

import json
from pathlib import Path

import torch

from promoe.config import ModelConfig
from promoe.errors import one_line, read_small_text
from promoe.train_config import DataSection, ModelSection, RunConfig, TrainSection, model_config_from_fields
from promoe.weights import check_shapes_fit, read_tensors, read_weights_header
from promoe.zoo import build_from_config

PIPELINE_CLASS = "ProMoEPipeline"
TRANSFORMER_CLASS = "ProMoETransformer2DModel"
LIBRARY = "promoe.hf"  # the module that defines both classes (diffusers records it in model_index.json)
INDEX = "model_index.json"
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PREFIX = "dit."  # the transformer holds our DiT as its submodule `dit`
VAE = ("diffusers", "AutoencoderKL")
# The schedulers a promoe pipeline may hold, with the objective (promoe.diffusion.OBJECTIVES) of their models.
SCHEDULER_OBJECTIVES = {
    "FlowMatchEulerDiscreteScheduler": "rf",
    "FlowMatchHeunDiscreteScheduler": "rf",
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "ddpm",
}


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {what}")
    try:
        values = json.loads(read_small_text(path, what))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not JSON ({one_line(str(error), 200)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a {type(values).__name__}, not a JSON object")
    return values


def check_local_folder(path: str | Path, what: str) -> Path:
    """A local folder, or a clear error: promoe never asks the Hub for a name it does not find here."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a local folder ({what}); promoe loads diffusers folders from disk "
                                "only, nothing is downloaded")
    return folder


def check_pipeline_index(path: str | Path) -> dict:
    """model_index.json of a promoe pipeline folder, every component checked; a ValueError that says what is wrong for
    a folder of any other pipeline."""
    folder = check_local_folder(path, "a ProMoEPipeline folder")
    index = read_json(folder / INDEX, "it says which pipeline the folder holds")
    name = f"{folder / INDEX}"
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{name}: not a promoe pipeline (it holds a {index.get('_class_name')!r}, promoe writes "
                         f"{PIPELINE_CLASS!r})")
    if index.get("transformer") != [LIBRARY, TRANSFORMER_CLASS]:
        raise ValueError(f"{name}: transformer {index.get('transformer')!r}, a promoe pipeline holds "
                         f"{[LIBRARY, TRANSFORMER_CLASS]}")
    scheduler = index.get("scheduler")
    if not (isinstance(scheduler, list) and len(scheduler) == 2 and scheduler[0] == "diffusers"
            and scheduler[1] in SCHEDULER_OBJECTIVES):
        raise ValueError(f"{name}: scheduler {scheduler!r}; a promoe pipeline holds one of diffusers' "
                         f"{', '.join(SCHEDULER_OBJECTIVES)}")
    if index.get("vae", [None, None]) not in ([None, None], list(VAE)):
        raise ValueError(f"{name}: vae {index.get('vae')!r}; a promoe pipeline holds {list(VAE)} or none")
    extra = sorted(key for key in index if not key.startswith("_") and key not in ("transformer", "scheduler", "vae"))
    if extra:
        raise ValueError(f"{name}: unknown component(s) {extra}; a promoe pipeline holds transformer, scheduler, vae")
    return index


def transformer_config(path: str | Path) -> ModelConfig:
    """The model config of a ProMoETransformer2DModel folder: every field checked as our checkpoints' are (an
    unknown field is an error, not a warning)."""
    folder = check_local_folder(path, "a ProMoETransformer2DModel folder")
    values = read_json(folder / CONFIG, "it holds the config that rebuilds the model")
    if values.get("_class_name") != TRANSFORMER_CLASS:
        raise ValueError(f"{folder / CONFIG}: not a promoe transformer (class {values.get('_class_name')!r}, "
                         f"promoe writes {TRANSFORMER_CLASS!r})")
    return model_config_from_fields({k: v for k, v in values.items() if not k.startswith("_")},
                                    str(folder / CONFIG))


def check_transformer_folder(path: str | Path) -> ModelConfig:
    """(the config of) a ProMoETransformer2DModel folder whose weights fit the model its config describes: shapes
    compared on `meta` before anything is loaded or built (promoe.weights.check_shapes_fit), the first missing,
    unexpected or mis-shaped tensor named."""
    config = transformer_config(path)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: it holds the model's weights")
    check_shapes_fit(config, read_weights_header(weights)[0], str(weights), prefix=PREFIX)
    return config


def load_transformer(path: str | Path) -> torch.nn.Module:
    """Our DiT (eval mode) from a ProMoETransformer2DModel folder, without diffusers."""
    config = check_transformer_folder(path)
    state = read_tensors(Path(path) / WEIGHTS)
    model = build_from_config(config)
    model.load_state_dict({key.removeprefix(PREFIX): value for key, value in state.items()})
    return model.eval()


def scheduler_objective(folder: Path, config: ModelConfig) -> str:
    """The objective (as `train.objective`) of a pipeline's model, from its scheduler: rectified flow for the flow
    schedulers; for DDPM, `ddpm-fixed` where a model with variance channels samples with a fixed variance."""
    name = check_pipeline_index(folder)["scheduler"][1]
    objective = SCHEDULER_OBJECTIVES[name]
    if name == "DDPMScheduler" and config.learn_sigma:
        variance = read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler's config")
        if variance.get("variance_type") not in ("learned", "learned_range"):
            return "ddpm-fixed"
    return objective


def load_pipeline_folder(path: str | Path) -> tuple[torch.nn.Module, RunConfig]:
    """(our DiT, a RunConfig saying what sampling needs: the model, its objective, pixels or latents and where its VAE
    is) from a ProMoEPipeline folder, without diffusers: what `promoe.sample --ckpt DIR` reads."""
    folder = Path(path)
    index = check_pipeline_index(folder)
    model = load_transformer(folder / "transformer")
    latent = index.get("vae", [None, None]) == list(VAE)
    config = RunConfig(model=ModelSection(resolved=model.config),
                       data=DataSection(kind="latents" if latent else "pixels",
                                        vae=str(folder / "vae") if latent else None),
                       train=TrainSection(objective=scheduler_objective(folder, model.config)))
    return model, config
