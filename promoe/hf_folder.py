"""diffusers folders of promoe models, checked and read without diffusers (`promoe.hf` writes them; `promoe.sample`
and `ProMoEPipeline.from_pretrained` read them through here):

    DIR/model_index.json        {"_class_name": "ProMoEPipeline",
                                 "transformer": ["promoe.hf", "ProMoETransformer2DModel"],
                                 "scheduler": ["diffusers", <a scheduler of SCHEDULER_OBJECTIVES>],
                                 "vae": ["diffusers", "AutoencoderKL"], or [null, null] for a pixel-space model}
    DIR/transformer/config.json every ModelConfig field and the model's `objective` (promoe.diffusion.OBJECTIVES),
                                beside diffusers' own `_class_name`, `_diffusers_version`
    DIR/transformer/<weights>   the DiT's state dict, each key under "dit.", in any layout diffusers' save_pretrained
                                writes (`weights_files`): diffusion_pytorch_model.safetensors, a variant of it
                                (diffusion_pytorch_model.fp16.safetensors), shards named by
                                diffusion_pytorch_model.safetensors.index.json, or the .bin equivalents
    DIR/scheduler/scheduler_config.json
    DIR/vae/                    the AutoencoderKL (latent models only)

A folder is local: nothing is downloaded. Its model_index.json names the modules that diffusers imports to load it,
so a folder that names any other class than these is refused before diffusers reads it. Every safetensors weights
file promoe writes records the digest of its tensors (`seal`), checked before it is read (`check_digest`).
"""

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from promoe.config import ModelConfig
from promoe.diffusion import OBJECTIVES, make_objective
from promoe.diffusion.schedulers import ddpm_betas
from promoe.errors import Refusal, one_line, parse_json, quoted, read_small_text, written_atomically
from promoe.train_config import DataSection, ModelSection, RunConfig, TrainSection, model_config_from_fields
from promoe.weights import TENSORS_DIGEST, check_shapes_fit, read_tensors, tensors_digest
from promoe.zoo import build_from_config, check_memory

PIPELINE_CLASS = "ProMoEPipeline"
TRANSFORMER_CLASS = "ProMoETransformer2DModel"
LIBRARY = "promoe.hf"  # the module that defines both classes (diffusers records it in model_index.json)
INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# diffusers' weights names (diffusers.utils.constants), and the names of the index of their shards.
SAFETENSORS = "diffusion_pytorch_model.safetensors"
PICKLED = "diffusion_pytorch_model.bin"
WEIGHTS = SAFETENSORS  # what promoe writes by default
PREFIX = "dit."  # the transformer holds our DiT as its submodule `dit`
VAE = ("diffusers", "AutoencoderKL")
COMPONENTS = ("transformer", "scheduler", "vae")
OBJECTIVE_NAMES = {"rf": "rectified flow", "ddpm": "DDPM", "ddpm-fixed": "DDPM with a fixed variance"}
# The diffusers schedulers that sample a model of each objective; `scheduler_changes` says how each is set.
SCHEDULERS_OF = {
    "rf": ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DPMSolverMultistepScheduler"),
    "ddpm": ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"),
}
# The schedulers a promoe pipeline may hold, with the objective of their models where the folder does not record it
# (folders written before the transformer's config held its objective).
SCHEDULER_OBJECTIVES = {
    "FlowMatchEulerDiscreteScheduler": "rf",
    "FlowMatchHeunDiscreteScheduler": "rf",
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "ddpm",  # "rf" where its config says use_flow_sigmas
}
FLOW_TRAIN_TIMESTEPS = 1000  # a rectified-flow model is told sigma * 1000 (promoe.diffusion.rectified_flow)


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_json(path: Path, what: str) -> dict:
    """The JSON object of a small file (errors.read_small_text's bounds: its size, a FIFO, UTF-8), parsed by
    errors.parse_json (its nesting bounded); what is wrong said in one line naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {what}")
    text = read_small_text(path, what)
    try:
        values = parse_json(text)
    except Refusal as error:
        raise Refusal(f"{path} is not JSON ({error})") from None
    if not isinstance(values, dict):
        raise Refusal(f"{path} holds a {type(values).__name__}, not a JSON object")
    return values


def check_local_folder(path: str | Path, what: str) -> Path:
    """A local folder, or a clear error: promoe never asks the Hub for a name it does not find here."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a local folder ({what}); promoe loads diffusers folders from disk "
                                "only, nothing is downloaded")
    return folder


def check_pipeline_index(path: str | Path) -> dict:
    """model_index.json of a promoe pipeline folder, every component checked and its folder present; a Refusal that
    says what is wrong for a folder of any other pipeline."""
    folder = check_local_folder(path, "a ProMoEPipeline folder")
    index = read_json(folder / INDEX, "it says which pipeline the folder holds")
    name = f"{folder / INDEX}"
    if index.get("_class_name") != PIPELINE_CLASS:
        raise Refusal(f"{name}: not a promoe pipeline (it holds a {quoted(index.get('_class_name'))}, promoe "
                      f"writes {PIPELINE_CLASS!r})")
    if index.get("transformer") != [LIBRARY, TRANSFORMER_CLASS]:
        raise Refusal(f"{name}: transformer {quoted(index.get('transformer'))}, a promoe pipeline holds "
                      f"{[LIBRARY, TRANSFORMER_CLASS]}")
    scheduler = index.get("scheduler")
    if not (isinstance(scheduler, list) and len(scheduler) == 2 and scheduler[0] == "diffusers"
            and scheduler[1] in SCHEDULER_OBJECTIVES):
        raise Refusal(f"{name}: scheduler {quoted(scheduler)}; a promoe pipeline holds one of diffusers' "
                      f"{', '.join(SCHEDULER_OBJECTIVES)}")
    if index.get("vae", [None, None]) not in ([None, None], list(VAE)):
        raise Refusal(f"{name}: vae {quoted(index.get('vae'))}; a promoe pipeline holds {list(VAE)} or none")
    extra = sorted(key for key in index if not key.startswith("_") and key not in COMPONENTS)
    if extra:
        raise Refusal(f"{name}: unknown component(s) {quoted(extra)}; a promoe pipeline holds "
                      f"{', '.join(COMPONENTS)}")
    for component in COMPONENTS:
        if index.get(component, [None, None]) != [None, None] and not (folder / component).is_dir():
            raise FileNotFoundError(f"{folder / component} is missing: {INDEX} names a {component} "
                                    f"({index[component][1]}); copy the whole pipeline folder")
    return index


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' name of a variant's file: the variant before the last suffix (x.safetensors -> x.fp16.safetensors,
    x.safetensors.index.json -> x.safetensors.index.fp16.json)."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def weights_files(path: str | Path, variant: str | None = None, use_safetensors: bool | None = None) -> list[Path]:
    """The weights files of a model folder that diffusers' ModelMixin.from_pretrained reads, in its order: the shards
    that the index names, else the single safetensors file, else (unless use_safetensors=True) the single .bin.
    Written here by hand because promoe.sample reads these folders without diffusers; diffusers' older index name of a
    sharded variant (deprecated there) is not read."""
    folder = Path(path)
    safetensors = use_safetensors is not False
    index = folder / with_variant((SAFETENSORS if safetensors else PICKLED) + ".index.json", variant)
    if index.is_file():
        return shard_files(index)
    tried = [with_variant(SAFETENSORS, variant)] if safetensors else []
    if use_safetensors is not True:
        tried.append(with_variant(PICKLED, variant))
    for name in tried:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder / tried[0]} is missing: it holds the model's weights (nor is there "
                            f"{' or '.join([index.name, *tried[1:]])})")


def shard_files(index: Path) -> list[Path]:
    """The files an index of shards names ({"weight_map": {tensor: file}}), each a file of the index's folder."""
    weight_map = read_json(index, "the index of the weights' shards").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise Refusal(f"{index}: weight_map is not a mapping of tensor names to files")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or name in ("", ".", ".."):
            raise Refusal(f"{index} names {quoted(name)}, which is not a file of {index.parent}: not loaded")
        if not (index.parent / name).is_file():
            raise FileNotFoundError(f"{index.parent / name} is missing: {index.name} names it as a shard of the "
                                    "weights")
    return [index.parent / name for name in files]


def weights_shapes(files: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of weights files as meta tensors of their stored shapes, from their headers: nothing of the
    tensors is read (a .bin is mapped onto `meta` by torch.load(weights_only=True), which runs no code)."""
    shapes: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in file_shapes(path).items():
            if name in shapes:
                raise Refusal(f"{path}: tensor {quoted(name)} is in another shard too: not loaded")
            shapes[name] = tensor
    return shapes


def file_shapes(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as file:
                return {name: torch.empty(file.get_slice(name).get_shape(), device="meta") for name in file.keys()}
        except SafetensorError as error:
            raise Refusal(f"{path} is not a readable safetensors file ({one_line(str(error), 120)}): cut short? "
                          "Copy or save it again") from None
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as error:  # torch.load raises what the damage makes of it (UnpicklingError, RuntimeError, ...)
        raise Refusal(f"{path} is not a readable torch file of tensors ({type(error).__name__}: "
                      f"{one_line(str(error), 160)})") from None
    if not (isinstance(state, dict) and all(isinstance(value, torch.Tensor) for value in state.values())):
        raise Refusal(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


class _FileTensors(Mapping):
    """The tensors of an open safetensors file as a mapping, each read when asked for: a digest in bounded memory."""

    def __init__(self, file):
        self.file = file

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(name)

    def __iter__(self):
        return iter(self.file.keys())

    def __len__(self) -> int:
        return len(self.file.keys())


def check_digest(path: Path) -> None:
    """A safetensors file's tensors against the digest recorded in it when promoe wrote it (a file without one, written
    before or by others, passes as it is); read one tensor at a time."""
    try:
        with safe_open(str(path), framework="pt") as file:
            recorded = (file.metadata() or {}).get(TENSORS_DIGEST)
            if recorded is not None and recorded != tensors_digest(_FileTensors(file)):
                raise Refusal(f"{path} is damaged: its tensors do not match the digest recorded when it was "
                              "written; copy or save it again")
    except SafetensorError as error:
        raise Refusal(f"{path} is not a readable safetensors file ({one_line(str(error), 120)}): cut short? Copy "
                      "or save it again") from None


def seal(path: Path) -> None:
    """Record in a safetensors file that diffusers wrote the digest of its tensors (`check_digest`'s). diffusers'
    save_pretrained takes no metadata, so the header is rewritten here by hand: the tensors' bytes are copied as
    diffusers wrote them, streamed, behind a header that adds the digest (padded to 8 bytes, as safetensors does)."""
    with safe_open(str(path), framework="pt") as file:
        digest = tensors_digest(_FileTensors(file))
    with open(path, "rb") as source:
        header_bytes = int.from_bytes(source.read(8), "little")
        header = json.loads(source.read(header_bytes))
        header["__metadata__"] = {**header.get("__metadata__", {}), TENSORS_DIGEST: digest}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with written_atomically(path) as tmp, open(tmp, "wb") as target:
            target.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(source, target, 1 << 24)


def transformer_config(path: str | Path) -> tuple[ModelConfig, str | None]:
    """(the model config, the objective or None where the folder predates it) of a ProMoETransformer2DModel folder:
    every field checked as our checkpoints' are (an unknown field is an error, not a warning)."""
    folder = check_local_folder(path, "a ProMoETransformer2DModel folder")
    values = read_json(folder / CONFIG, "it holds the config that rebuilds the model")
    if values.get("_class_name") != TRANSFORMER_CLASS:
        raise Refusal(f"{folder / CONFIG}: not a promoe transformer (class {quoted(values.get('_class_name'))}, "
                      f"promoe writes {TRANSFORMER_CLASS!r})")
    objective = values.pop("objective", None)
    if objective is not None and objective not in OBJECTIVES:
        raise Refusal(f"{folder / CONFIG}: objective {quoted(objective)}; choose one of {', '.join(OBJECTIVES)}")
    return model_config_from_fields({k: v for k, v in values.items() if not k.startswith("_")},
                                    str(folder / CONFIG)), objective


def check_transformer_folder(path: str | Path, variant: str | None = None, use_safetensors: bool | None = None
                             ) -> tuple[ModelConfig, str | None, list[Path]]:
    """(config, objective, weights files) of a ProMoETransformer2DModel folder whose weights fit the model its config
    describes: the files diffusers would read (`weights_files`), their shapes compared on `meta` before anything is
    loaded or built (promoe.weights.check_shapes_fit), the first missing, unexpected or mis-shaped tensor named, then
    each safetensors file's digest checked. A model larger than the memory free is refused before any of it."""
    config, objective = transformer_config(path)
    check_memory(config, str(Path(path) / CONFIG))
    files = weights_files(path, variant, use_safetensors)
    source = str(files[0]) if len(files) == 1 else f"{path} (the shards of {len(files)} files)"
    check_shapes_fit(config, weights_shapes(files), source, prefix=PREFIX)
    for file in files:
        if file.suffix == ".safetensors":
            check_digest(file)
    return config, objective, files


def load_transformer(path: str | Path) -> tuple[torch.nn.Module, str | None]:
    """(our DiT in eval mode, its objective or None) from a ProMoETransformer2DModel folder, without diffusers."""
    config, objective, files = check_transformer_folder(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_tensors(file) if file.suffix == ".safetensors" else
                     torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    model = build_from_config(config)
    model.load_state_dict({key.removeprefix(PREFIX): value for key, value in state.items()})
    return model.eval(), objective


def inferred_objective(scheduler: str, settings: dict, config: ModelConfig) -> str:
    """The objective of a model whose folder does not record it, from its scheduler (class name, config): rectified
    flow for the flow schedulers; for DDPM, `ddpm-fixed` where a model with variance channels samples with a fixed
    variance."""
    if scheduler == "DPMSolverMultistepScheduler" and settings.get("use_flow_sigmas"):
        return "rf"
    if scheduler == "DDPMScheduler" and config.learn_sigma and settings.get("variance_type") not in (
            "learned", "learned_range"):
        return "ddpm-fixed"
    return SCHEDULER_OBJECTIVES[scheduler]


def scheduler_changes(objective: str, scheduler: str, settings: dict, config: ModelConfig) -> dict:
    """The settings that a diffusers scheduler (class name, config) must change to sample a model of `objective` and
    `config`: {} where it fits as it is; a Refusal naming both where no setting makes it fit. What the model fixes
    is set (rectified flow: the flow sigmas and the velocity; DDPM: the training betas, the noise prediction, the
    learned variance range where the model learned it); what is a sampling choice (steps, spacing, order, shift,
    clipping) is left as the scheduler has it."""
    kind = "rf" if objective == "rf" else "ddpm"
    if scheduler not in SCHEDULERS_OF[kind]:
        raise Refusal(f"{scheduler} does not sample this transformer, trained with {OBJECTIVE_NAMES[objective]} "
                      f"(objective {objective!r}): give it one of {', '.join(SCHEDULERS_OF[kind])}")
    if kind == "rf":
        wanted = {"num_train_timesteps": FLOW_TRAIN_TIMESTEPS}
        if scheduler == "DPMSolverMultistepScheduler":
            wanted.update(use_flow_sigmas=True, prediction_type="flow_prediction")
    else:
        ddpm = make_objective(objective)
        wanted = {**ddpm_betas(ddpm), "trained_betas": None, "rescale_betas_zero_snr": False}
        learned = ddpm.learns_variance(config.in_channels * (2 if config.learn_sigma else 1), config.in_channels)
        if scheduler == "DDPMScheduler" and (learned or settings.get("variance_type") in ("learned", "learned_range")):
            wanted["variance_type"] = "learned_range" if learned else "fixed_small"
        if scheduler == "DPMSolverMultistepScheduler":  # it is given the mean's C channels (schedulers.reads_variance)
            wanted.update(use_flow_sigmas=False, variance_type=None)
    return {key: value for key, value in wanted.items() if key in settings and settings[key] != value}


def check_scheduler_folder(folder: Path, index: dict, objective: str, config: ModelConfig) -> None:
    """A pipeline folder's scheduler fits its model as saved (promoe saves it fitted, see promoe.hf), checked before
    diffusers builds it from its config (a crafted num_train_timesteps sizes its tables)."""
    name = index["scheduler"][1]
    settings = read_json(folder / SCHEDULER_CONFIG, "the scheduler's config")
    try:
        changes = scheduler_changes(objective, name, settings, config)
    except ValueError as error:
        raise Refusal(f"{folder / SCHEDULER_CONFIG}: {error}") from None
    if changes:
        wrong = "; ".join(f"{key} {quoted(settings[key])}, the model's is {quoted(value)}"
                          for key, value in changes.items())
        raise Refusal(f"{folder / SCHEDULER_CONFIG}: {wrong} ({OBJECTIVE_NAMES[objective]} model): damaged or "
                      "edited? Save the pipeline again")


def pipeline_objective(folder: Path, index: dict) -> str:
    """The objective of a pipeline folder (`index` its checked model_index.json) whose scheduler fits its model: the
    one its transformer records, else (older folders) the one its scheduler implies."""
    config, objective = transformer_config(folder / "transformer")
    if objective is None:
        settings = read_json(folder / SCHEDULER_CONFIG, "the scheduler's config")
        objective = inferred_objective(index["scheduler"][1], settings, config)
    check_scheduler_folder(folder, index, objective, config)
    return objective


def load_pipeline_folder(path: str | Path) -> tuple[torch.nn.Module, RunConfig]:
    """(our DiT, a RunConfig saying what sampling needs: the model, its objective, pixels or latents and where its VAE
    is) from a ProMoEPipeline folder, without diffusers: what `promoe.sample --ckpt DIR` reads."""
    folder = Path(path)
    index = check_pipeline_index(folder)
    objective = pipeline_objective(folder, index)
    model, _ = load_transformer(folder / "transformer")
    latent = index.get("vae", [None, None]) == list(VAE)
    config = RunConfig(model=ModelSection(resolved=model.config),
                       data=DataSection(kind="latents" if latent else "pixels",
                                        vae=str(folder / "vae") if latent else None),
                       train=TrainSection(objective=objective))
    return model, config
