"""The diffusion model: build a class-conditional UNet, save it, and load any supported layout.

``load_model`` is the one entry point every later stage uses. It accepts

* our own output folder: ``unet/`` + ``scheduler/`` (``save_pretrained``) + ``model_info.json``;
  a ``model_info.json`` with a ``source`` field is a pointer (``diffusion --pretrained``) and is
  followed to that source;
* a diffusers folder with the UNet config + weights at the root and ``scheduler_config.json``
  beside them (the layout of google/ddpm-cifar10-32);
* a pipeline folder with ``unet/`` and ``scheduler/`` sub-folders;
* a hub id (``owner/name``), resolved through the local hub cache or the network; where the hub
  cannot be reached this is a one-line ``UserError``.

Convention for class-conditional UNets: ``num_class_embeds = num_classes + 1`` and the last index
(``num_classes``) is the null class used for label dropout and classifier-free guidance. A
foreign conditional UNet without ``model_info.json`` is assumed to follow it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from pipeline.core.errors import UserError
from pipeline.core.shards import file_sha256

INFO_FILE = "model_info.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class DiffusionModel:
    """A loaded UNet (eval mode) with its noise schedule and the facts later stages record."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    num_classes: int | None  # None: unconditional
    null_class: int | None
    image_size: int
    in_channels: int
    weights_sha256: str
    source: str

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None


def build_unet(*, image_size: int, in_channels: int, num_classes: int | None,
               block_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
               norm_groups: int = 16, attention: bool = False) -> UNet2DModel:
    """A UNet2DModel with one resolution level per entry of ``block_channels``.

    Attention is off by default: at 28 px on a CPU it tripled the step time for no visible gain
    in samples. ``image_size`` must be divisible by 2**(levels-1) (28 px: up to 3 levels).
    """
    levels = len(block_channels)
    if levels < 1 or image_size % (2 ** (levels - 1)):
        raise UserError(f"image size {image_size} is not divisible by 2^{levels - 1} "
                        f"(one halving per extra entry of block_channels {block_channels})")
    if any(c % norm_groups for c in block_channels):
        raise UserError(f"block_channels {block_channels} must be multiples of {norm_groups}")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=tuple(block_channels), layers_per_block=layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_groups,
                       num_class_embeds=None if num_classes is None else num_classes + 1)


def tiny_unet(image_size: int = 28, in_channels: int = 1, num_classes: int | None = 10) -> UNet2DModel:
    """A few-thousand-parameter UNet for tests: fast, structurally the same as the real one."""
    return build_unet(image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                      block_channels=(8, 16), layers_per_block=1, norm_groups=4)


def make_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    try:
        return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                             prediction_type="epsilon", clip_sample=True)
    except NotImplementedError as exc:
        raise UserError(f"beta schedule {beta_schedule!r}: {exc}") from None


def weights_file(unet_dir: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    raise UserError(f"{unet_dir}: no UNet weights ({' or '.join(WEIGHT_NAMES)})")


def save_model(out: str | Path, unet: UNet2DModel, scheduler: DDPMScheduler, info: dict) -> dict:
    """Write unet/, scheduler/ and model_info.json (last) into ``out``; returns the full info.

    The caller writes into a temporary folder and renames it, so ``out`` is complete or absent.
    """
    out = Path(out)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    n = unet.config.num_class_embeds
    info = {"num_classes": None if n is None else n - 1, "null_class": None if n is None else n - 1,
            "image_size": int(unet.config.sample_size), "in_channels": int(unet.config.in_channels),
            "weights_sha256": file_sha256(weights_file(out / "unet")), **info}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def _resolve(path_or_id: str) -> Path:
    """A local folder, or a hub id downloaded (or found in the hub cache) to a local snapshot."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path_or_id}: a diffusion model must be a folder, not a file")
        return path
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise UserError(f"diffusion model not found: {path_or_id} (a folder or a hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's to fix (network, id, auth)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot fetch {path_or_id!r} from the hub ({first}); download it elsewhere "
                        "and pass the local folder") from None


def _locate(root: Path) -> tuple[Path, Path]:
    """(unet folder, folder holding scheduler_config.json) for the supported layouts."""
    if (root / "unet" / "config.json").is_file():
        sched = root / "scheduler"
        if not (sched / "scheduler_config.json").is_file():
            raise UserError(f"{root}: has unet/ but no scheduler/scheduler_config.json")
        return root / "unet", sched
    if (root / "config.json").is_file():
        if not (root / "scheduler_config.json").is_file():
            raise UserError(f"{root}: UNet at the root but no scheduler_config.json beside it")
        return root, root
    raise UserError(f"{root}: not a diffusers model folder (expected unet/ + scheduler/, "
                    "or config.json + scheduler_config.json at the root)")


MAX_POINTERS = 8  # model_info.json pointers followed at most (a loop would recurse forever)


def load_model(path_or_id: str, device: str = "cpu", _hops: int = 0) -> DiffusionModel:
    """Load a diffusion model from any supported layout (see the module docstring); eval mode."""
    root = _resolve(str(path_or_id))
    info: dict = {}
    if (root / INFO_FILE).is_file():
        try:
            info = json.loads((root / INFO_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{root / INFO_FILE}: malformed ({exc})") from None
        if not isinstance(info, dict):
            raise UserError(f"{root / INFO_FILE}: malformed (a JSON object is expected)")
        if info.get("source"):  # a pointer written by `diffusion --pretrained`
            if _hops >= MAX_POINTERS:
                raise UserError(f"{root}: more than {MAX_POINTERS} model_info.json pointers in a row (a loop?)")
            target = load_model(str(info["source"]), device, _hops + 1)
            if info.get("weights_sha256") and info["weights_sha256"] != target.weights_sha256:
                raise UserError(f"{root}: points at {info['source']}, whose weights changed since "
                                "(sha256 differs); run the diffusion stage again")
            target.source = str(path_or_id)
            return target
    unet_dir, sched_dir = _locate(root)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir)
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load UNet2DModel from {unet_dir}: {str(exc).splitlines()[0]}") from None
    n = unet.config.num_class_embeds
    num_classes = info.get("num_classes", None if n is None else n - 1)
    null_class = info.get("null_class", num_classes)
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    sha = file_sha256(weights_file(unet_dir))
    if info.get("weights_sha256") and info["weights_sha256"] != sha:
        raise UserError(f"{unet_dir}: weights differ from the sha256 in {INFO_FILE} (corrupted?)")
    return DiffusionModel(unet=unet.to(device).eval().requires_grad_(False), scheduler=scheduler,
                          num_classes=num_classes, null_class=null_class, image_size=int(size),
                          in_channels=int(unet.config.in_channels),
                          weights_sha256=sha,
                          source=str(path_or_id))


def model_files(path_or_id: str, model: DiffusionModel, _hops: int = 0) -> dict[str, bytes]:
    """The files of a local model in this project's layout, by relative path, for bundling into a
    store (``extract --bundle-model``): the UNet's config and weights and the scheduler's config,
    byte for byte as they are (so the weights keep their sha256), and a ``model_info.json`` that is
    not a pointer. ``model_info.json`` pointers are followed as ``load_model`` follows them."""
    root = Path(path_or_id).expanduser()
    if not root.is_dir():
        raise UserError(f"--bundle-model needs a local model folder; {path_or_id} is not one (a hub id: download "
                        "it and pass the folder)")
    info_file = root / INFO_FILE
    if info_file.is_file():
        source = json.loads(info_file.read_text()).get("source")
        if source:
            if _hops >= MAX_POINTERS:
                raise UserError(f"{root}: more than {MAX_POINTERS} model_info.json pointers in a row (a loop?)")
            return model_files(str(source), model, _hops + 1)
    unet_dir, sched_dir = _locate(root)
    weights = weights_file(unet_dir)
    files = {"unet/config.json": (unet_dir / "config.json").read_bytes(), f"unet/{weights.name}": weights.read_bytes(),
             "scheduler/scheduler_config.json": (sched_dir / "scheduler_config.json").read_bytes()}
    if hashlib.sha256(files[f"unet/{weights.name}"]).hexdigest() != model.weights_sha256:
        raise UserError(f"{weights}: changed while extracting (sha256 differs from the loaded model's)")
    info = {"num_classes": model.num_classes, "null_class": model.null_class, "image_size": model.image_size,
            "in_channels": model.in_channels, "weights_sha256": model.weights_sha256}
    return {**files, INFO_FILE: (json.dumps(info, indent=2) + "\n").encode()}


def pointer_info(model: DiffusionModel, source: str) -> dict:
    """model_info.json for ``diffusion --pretrained``: later stages follow ``source`` to the model."""
    local = Path(source).expanduser()
    return {"source": str(local.resolve()) if local.exists() else source,
            "num_classes": model.num_classes, "null_class": model.null_class,
            "image_size": model.image_size, "in_channels": model.in_channels,
            "weights_sha256": model.weights_sha256, "trained": False}
