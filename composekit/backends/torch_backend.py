"""PyTorch backend: diffusers / transformers model classes, on CPU or CUDA.

The components are loaded with diffusers' and transformers' own ``from_pretrained`` from
safetensors only. Calls run under ``torch.inference_mode``; the modules are not mutated after
loading, so one backend may serve several threads at once (each call allocates its own tensors).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from composekit.backends.base import ModelCard, ModelInfo, model_call
from composekit.backends.single_token_attention import apply as apply_single_token_attention
from composekit.backends.token_downsampling import apply as apply_token_downsampling
from composekit.backends.unet_split import FeatureTap, ShallowUNet, feature_channels
from composekit.core.devices import parse_device
from composekit.core.options import MAX_TOKEN_DOWNSAMPLING, check_bool, check_choice, check_integer
from composekit.errors import BackendUnavailableError, InputError, ModelError, install_hint
from composekit.formats.model_source import TINY_VAE_ALLOW_PATTERNS, ModelFiles, resolve_source

__all__ = ["TorchBackend", "load"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _device(device: Any) -> torch.device:
    if device is None:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("device=None: using %s", chosen)
        return chosen
    dev = torch.device(str(parse_device(device, backend="torch", allowed=("cpu", "cuda", "mps"))))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {device!r} was requested but torch sees no CUDA GPU (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); install a CUDA build of torch or pass device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)"
        )
    return dev


def _dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; expected one of float32, float16, bfloat16")
    return _DTYPES[key]


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers' and transformers' load-time chatter (restored afterwards).

    Their notes about optional packages and dtype casts are not actionable for composekit's users;
    real problems still surface as exceptions, which are translated into :class:`ModelError`.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        tlog.enable_progress_bar()


def image_encoder_class() -> type:
    """diffusers' ``PaintByExampleImageEncoder`` (moved under ``pipelines/deprecated`` in newer releases)."""
    try:
        from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    except ImportError:
        from diffusers.pipelines.paint_by_example.image_encoder import PaintByExampleImageEncoder
    return PaintByExampleImageEncoder


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# diffusers' and transformers' lazy module imports are not thread-safe: two threads resolving
# `from diffusers import AutoencoderKL` at once can see a half-initialised module (ImportError). Model
# loads take this lock, so concurrent from_pretrained calls load one after another.
_LOAD_LOCK = threading.RLock()


class ComputeThread:
    """The one thread of this process that runs composekit's torch work (loading, model calls, the sampler).

    Why: libgomp (PyTorch's OpenMP on Linux) gives every thread that starts parallel work its own team of
    worker threads, and once the process has more such threads than cores it stops spinning between parallel
    regions and sleeps instead. A model loaded on the main thread and then called from a service's worker
    thread (or from a new thread per request) has two teams: measured on a 2-core AVX2 CPU, a 150-step tiny
    paste took 5.1-6.6 s from a worker thread against 1.8-2.0 s on the main thread, and 1.9 s from any
    thread once all torch work ran on one thread (``benchmarks/threads.py``). So every caller hands its torch
    work to this thread; concurrent callers' calls run one after another (they would share the same cores
    anyway). Torch work a program does itself on other threads still makes teams of its own.
    """

    _executor: ThreadPoolExecutor | None = None
    _ident: int | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the compute thread (directly when already on it); exceptions propagate."""
        if threading.get_ident() == cls._ident:
            return fn(*args, **kwargs)
        with cls._lock:
            if cls._executor is None:
                cls._executor = ThreadPoolExecutor(1, thread_name_prefix="composekit-torch")
                cls._ident = cls._executor.submit(threading.get_ident).result()
        return cls._executor.submit(fn, *args, **kwargs).result()


def on_compute_thread(fn: Any) -> Any:
    """Run the decorated function on :class:`ComputeThread`."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return ComputeThread.run(fn, *args, **kwargs)
    return call


def _check_weights(paths: tuple[Path, ...]) -> int:
    """Every stored tensor must be floating point (integer index buffers excepted); names the tensor.
    Returns how many numbers the weight files hold (read from their headers)."""
    from safetensors import safe_open

    stored = 0
    for path in paths:
        try:
            with safe_open(str(path), framework="np") as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                dtypes = {key: s.get_dtype() for key, s in slices.items()}
                stored += sum(math.prod(s.get_shape()) for s in slices.values())
        except Exception as exc:  # safetensors' SafetensorError for a header it cannot parse
            raise ModelError(f"{path} is not a readable safetensors file ({exc}); re-download the model") from None
        for key, dtype in dtypes.items():
            if dtype not in _FLOAT_DTYPES and not key.endswith(("position_ids", "num_batches_tracked")):
                raise ModelError(f"{path}: tensor {key!r} has dtype {dtype}; expected a float type")
    return stored


def _skeleton_parameters(cls: Any, folder: Path, init_empty_weights: Any) -> int:
    """How many parameters the component's config describes, counted on a skeleton whose tensors hold no
    memory (accelerate's empty-weights context: what diffusers and transformers use for their own lazy loads)."""
    with quiet_loading(), init_empty_weights():
        if hasattr(cls, "config_class"):  # transformers
            module = cls(cls.config_class.from_pretrained(str(folder)))
        else:  # diffusers (and composekit's adaptor, a diffusers model)
            module = cls.from_config(cls.load_config(str(folder)))
    return sum(p.numel() for p in module.parameters())


# A config may describe at most twice the numbers its weight files hold (plus this many) before anything is
# built: a smaller disagreement costs no more memory than the files themselves and is then named tensor by
# tensor by the load's own checks (missing or wrongly shaped weights).
_SKELETON_SLACK = 2**20


def _refuse_oversized_config(cls: Any, folder: Path, name: str, stored: int) -> None:
    """Refuse a config that needs far more parameters than the weight files hold, before anything is allocated.

    Such a pair can never load (some weight would be missing or of the wrong shape), but diffusers and
    transformers build and initialise the whole model from the config before comparing it with the weights:
    a corrupt or hostile config (a width of 10^8, a 16384-wide CLIP) would first allocate tens of GB."""
    try:
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise BackendUnavailableError(f"the torch backend needs accelerate ({exc}); {install_hint('torch')}") from exc
    try:
        needed = _skeleton_parameters(cls, folder, init_empty_weights)
    except Exception as exc:  # the libraries' own refusals of impossible configs (ValueError, TypeError, ...)
        raise ModelError(
            f"could not build {name} from {folder / 'config.json'}: {type(exc).__name__}: {exc}. The config is "
            "corrupt or from another model; re-download the model or rebuild it."
        ) from exc
    if needed > 2 * stored + _SKELETON_SLACK:
        raise ModelError(
            f"{folder / 'config.json'} describes {needed:,} parameters for the {name}, but its weight files hold "
            f"{stored:,} numbers: the config and the weights do not belong together (a corrupt or edited "
            "config?). Re-download the model or rebuild it; nothing was allocated."
        )


def _load_component(cls: Any, files: ModelFiles, name: str, device: torch.device, dtype: torch.dtype):
    """Load one component strictly: every weight present, of the right shape, finite."""
    stored = _check_weights(files.weights[name])
    folder = files.component_dir(name)
    _refuse_oversized_config(cls, folder, name, stored)
    kwargs: dict[str, Any] = {"use_safetensors": True, "output_loading_info": True}
    if hasattr(cls, "config_class"):
        # transformers: report wrongly shaped tensors in the loading info (we refuse them below, by name)
        kwargs["ignore_mismatched_sizes"] = True
    else:  # diffusers models: report missing keys instead of failing on meta tensors
        kwargs["low_cpu_mem_usage"] = False
    try:
        with quiet_loading():
            module, info = cls.from_pretrained(str(folder), **kwargs)
    except Exception as exc:  # diffusers/transformers raise many types for configs and weights that disagree
        raise ModelError(
            f"could not load {name} from {folder}: {type(exc).__name__}: {exc}. The config or the weights are "
            "corrupt or do not match each other; re-download the model or rebuild it."
        ) from exc
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing:
        unexpected = set(info.get("unexpected_keys", []))
        if unexpected and all(k.replace("vision_model.", "", 1) in unexpected for k in missing):
            import transformers

            raise ModelError(
                f"{folder}: its CLIP weights use the key layout of transformers 5 (no 'vision_model.' level), which "
                f"transformers {transformers.__version__} cannot read. Upgrade: `pip install 'transformers>=5'`, or "
                "rebuild the model with this transformers version (`composekit make-model`)")
        raise ModelError(f"{folder}: {len(missing)} weight(s) missing from the checkpoint, e.g. {missing[:5]}; "
                         "re-download the model")
    if mismatched:
        raise ModelError(f"{folder}: weight(s) with the wrong shape for the config: {mismatched[:5]}")
    if info.get("unexpected_keys"):
        logger.warning("%s: %d weight(s) in the files are not used, e.g. %s", folder, len(info["unexpected_keys"]),
                       sorted(info["unexpected_keys"])[:5])
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{folder}: tensor {key!r} holds NaN or inf values; the weights are corrupt")
    with quiet_loading():
        module = module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


class ObjectEncoder(torch.nn.Module):
    """The ``object_encoder`` spec: CLIP pixels -> (object context, unconditional context)."""

    def __init__(self, image_encoder: Any, adaptor: Any) -> None:
        super().__init__()
        self.encoder, self.adaptor = image_encoder, adaptor

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adaptor is not None:
            # ObjectStitch: all 257 CLIP tokens, CLIP's post layer norm, then the content adaptor.
            hidden = self.encoder(pixel_values=pixel_values).last_hidden_state
            clip = getattr(self.encoder, "vision_model", self.encoder)  # transformers 4 vs 5 layout
            context = self.adaptor(clip.post_layernorm(hidden))
            return context, self.adaptor.unconditional(pixel_values.shape[0])
        # Paint by Example: CLIP's class token through the mapper (one context token).
        context, uncond = self.encoder(pixel_values, return_uncond_vector=True)
        return context, uncond.to(context.dtype).expand(pixel_values.shape[0], -1, -1)


class UNet(torch.nn.Module):
    """The ``unet`` spec: noise prediction, and with a ``tap`` also the features that feature caching reuses
    (see :mod:`composekit.backends.unet_split`). ``unet`` may be the U-Net or its ``torch.compile``'d version."""

    def __init__(self, unet: Any, tap: Any = None) -> None:
        super().__init__()
        self.unet, self.tap = unet, tap

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        if self.tap is None:
            return self.predict(sample, timestep, encoder_hidden_states)
        eps, features = self.tap(self.predict, sample, timestep, encoder_hidden_states)
        return eps, features


class VaeEncoder(torch.nn.Module):
    """The ``vae_encoder`` spec: image in [-1, 1] -> scaled latent (posterior mean)."""

    def __init__(self, vae: Any, scaling: float) -> None:
        super().__init__()
        self.vae, self.scaling = vae, scaling

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.scaling


class VaeDecoder(torch.nn.Module):
    """The ``vae_decoder`` spec: scaled latent -> image in [-1, 1]; ``tiny_vae_decoder`` with an AutoencoderTiny,
    which decodes the U-Net's scaled latents directly (its scaling factor is 1)."""

    def __init__(self, vae: Any, scaling: float, channels_last: bool = False) -> None:
        super().__init__()
        self.vae, self.scaling, self.channels_last = vae, scaling, channels_last

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            latent = latent.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(latent / self.scaling, return_dict=False)[0]


class TorchBackend:
    """The four components as torch modules."""

    name = "torch"

    def __init__(self, files: ModelFiles, device: torch.device, dtype: torch.dtype, channels_last: bool = False,
                 compile: bool | str = False, token_downsampling: int = 1) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        self.device, self.dtype = device, dtype
        self.channels_last, self.compile_mode = channels_last, compile
        self.decoder = "vae_decoder"  # the component that decodes: "tiny_vae_decoder" after use_tiny_vae
        self._timesteps: dict[int, torch.Tensor] = {}
        self.family = files.family
        loaders: dict[str, Any] = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
        if files.family == "objectstitch":
            from transformers import CLIPVisionModel

            from composekit.core.adaptors import ContentAdaptor

            loaders.update(image_encoder=CLIPVisionModel, adaptor=ContentAdaptor)
        else:
            loaders.update(image_encoder=image_encoder_class())
        modules = {name: _load_component(cls, files, name, device, dtype) for name, cls in loaders.items()}
        self.image_encoder, self.unet_model, self.vae = modules["image_encoder"], modules["unet"], modules["vae"]
        self.adaptor = modules.get("adaptor")
        # Before compiling and before the feature split: every U-Net pass, and every graph traced from it, has it.
        self.token_downsampling = token_downsampling
        changed = apply_token_downsampling(self.unet_model, token_downsampling)
        if changed:
            logger.info("token downsampling %dx in %d self-attentions", token_downsampling, changed)
        # Exact: a one-token context (Paint by Example) makes each cross-attention a broadcast of one projection.
        self.single_token_attention = apply_single_token_attention(self.unet_model)
        logger.debug("single-token cross-attention shortcut on %d cross-attentions", self.single_token_attention)
        if channels_last:  # NHWC convolutions (faster with cuDNN's fp16 kernels); same weights, same function
            self.unet_model.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        # The module the step loop calls: the U-Net itself, or its torch.compile'd version.
        self._unet_call = self.unet_model
        if compile:
            mode = None if compile is True else compile
            self._unet_call = torch.compile(self.unet_model, mode=mode, fullgraph=False, dynamic=False)
        # Feature caching: the full pass also yields the deep features; the shallow pass reuses them.
        try:
            tap = FeatureTap(self.unet_model)
        except ModelError as exc:
            logger.info("feature caching unavailable: %s", exc)
            tap = None
        vae_cfg, unet_cfg = self.vae.config, self.unet_model.config
        scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.scaling = float(vae_cfg.scaling_factor)
        self.info = ModelInfo(
            family=files.family,
            model_size=int(unet_cfg.sample_size) * scale_factor,
            vae_scale_factor=scale_factor,
            latent_channels=int(vae_cfg.latent_channels),
            unet_in_channels=int(unet_cfg.in_channels),
            source=str(files.root),
            any_size_decode=True,
            feature_channels=feature_channels(self.unet_model) if tap is not None else 0,
            token_downsampling=token_downsampling,
        )
        self.card = ModelCard(self.info, files.configs["scheduler"], files.configs["feature_extractor"],
                              tuple(files.index.get("cutout_backdrop", [255, 255, 255])))
        # One module per component spec; the exporter traces these same modules.
        self.components: dict[str, torch.nn.Module] = {
            "object_encoder": ObjectEncoder(self.image_encoder, self.adaptor).eval(),
            "unet": UNet(self._unet_call, tap).eval(),
            "vae_encoder": VaeEncoder(self.vae, self.scaling).eval(),
            "vae_decoder": VaeDecoder(self.vae, self.scaling).eval(),
        }
        if tap is not None:
            self.components["unet_shallow"] = ShallowUNet(self.unet_model).eval()

    @staticmethod
    def compute(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (the sampler) on the thread that runs every torch call (see :class:`ComputeThread`)."""
        return ComputeThread.run(fn, *args, **kwargs)

    def describe(self) -> str:
        extras = (["channels_last"] if self.channels_last else []) + (
            [f"compiled ({self.compile_mode if isinstance(self.compile_mode, str) else 'default'})"]
            if self.compile_mode else [])
        extras += [f"token downsampling {self.token_downsampling}x"] if self.token_downsampling > 1 else []
        extras += ["tiny VAE decoder"] if self.decoder == "tiny_vae_decoder" else []
        return ", ".join([str(self.device), str(self.dtype).replace("torch.", ""), *extras])

    # -- plumbing ---------------------------------------------------------------------------------

    def asarray(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().to("cpu", torch.float32).numpy()

    def cat(self, xs: list[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(xs, dim=axis)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the four components ----------------------------------------------------------------------

    @on_compute_thread
    @torch.inference_mode()
    @model_call("image encoder")
    def encode_object(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.components["object_encoder"](self.asarray(pixels))

    @on_compute_thread
    @torch.inference_mode()
    @model_call("VAE encoder")
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.components["vae_encoder"](image)

    def _timestep(self, timestep: int) -> torch.Tensor:
        t = self._timesteps.get(int(timestep))
        if t is None:  # one host->device copy per distinct timestep, not one per step and call
            t = self._timesteps.setdefault(int(timestep), torch.tensor(int(timestep), device=self.device,
                                                                        dtype=torch.long))
        return t

    def _sample(self, sample: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            # CUDA-graph modes reuse their output buffers: each step's call starts a new "step", and the
            # sampler consumes eps before the next call.
            torch.compiler.cudagraph_mark_step_begin()
        return sample

    @on_compute_thread
    @torch.inference_mode()
    @model_call("U-Net")
    def unet(self, sample: torch.Tensor, timestep: int, context: torch.Tensor) -> torch.Tensor:
        return self.components["unet"].predict(self._sample(sample), self._timestep(timestep), context)

    @on_compute_thread
    @torch.inference_mode()
    @model_call("U-Net")
    def unet_with_features(self, sample: torch.Tensor, timestep: int, context: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.components["unet"](self._sample(sample), self._timestep(timestep), context)

    @on_compute_thread
    @torch.inference_mode()
    @model_call("U-Net (shallow pass)")
    def unet_shallow(self, sample: torch.Tensor, timestep: int, context: torch.Tensor,
                     features: torch.Tensor) -> torch.Tensor:
        return self.components["unet_shallow"](self._sample(sample), self._timestep(timestep), context, features)

    @on_compute_thread
    @torch.inference_mode()
    @model_call("VAE decoder")
    def decode(self, latents: torch.Tensor, tiny: bool = False) -> torch.Tensor:
        # One decoder: the VAE's, or the tiny one when loaded with vae= (then for every call).
        return self.components[self.decoder](latents)

    def use_tiny_vae(self, tiny_vae: Any) -> None:
        """Decode with ``tiny_vae`` (an AutoencoderTiny) from now on, in channels-last layout: on this project's
        CPU its decode took 0.21 s that way against 0.59 s NCHW in bf16 (0.64 s against 0.80 s in fp32)."""
        tiny_vae = tiny_vae.to(memory_format=torch.channels_last)
        self.components["tiny_vae_decoder"] = VaeDecoder(tiny_vae, 1.0, channels_last=True).eval()
        self.decoder = "tiny_vae_decoder"


def load_tiny_vae(path: Path, device: torch.device, dtype: torch.dtype, latent_channels: int) -> Any:
    """A diffusers ``AutoencoderTiny`` directory (TAESD's layout), checked like every component."""
    from diffusers import AutoencoderTiny

    from composekit.formats.model_source import check_safetensors
    from composekit.formats.safe_json import SCHEMAS, read_json

    fix = "pass the folder (or Hub id) of a diffusers AutoencoderTiny such as madebyollin/taesd"
    config = read_json(path / "config.json", schema=SCHEMAS["tiny_vae"], fix=fix,
                       missing=f"{path} has no config.json; {fix}")
    if config.get("_class_name") != "AutoencoderTiny":
        raise ModelError(f"{path} holds a {config.get('_class_name')!r}, not an AutoencoderTiny; {fix}")
    if config.get("latent_channels") != latent_channels:
        raise ModelError(f"{path}: the tiny VAE has {config.get('latent_channels')!r} latent channels, the model "
                         f"{latent_channels}; {fix} made for this model's latent space")
    weights = path / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path} has no diffusion_pytorch_model.safetensors (pickle weights are refused); {fix}")
    check_safetensors(weights)
    _refuse_oversized_config(AutoencoderTiny, path, "tiny VAE", _check_weights((weights,)))
    try:
        with quiet_loading():
            module, info = AutoencoderTiny.from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False,
                                                           output_loading_info=True, torch_dtype=dtype)
    except Exception as exc:  # diffusers raises many types for configs and weights that disagree
        raise ModelError(f"could not load the tiny VAE from {path}: {type(exc).__name__}: {exc}; {fix}") from exc
    if info.get("missing_keys"):
        raise ModelError(f"{path}: the tiny VAE's weights lack {sorted(info['missing_keys'])[:5]}; {fix}")
    return module.to(device).eval()  # already in dtype (torch_dtype above)


@on_compute_thread
def load(content: ModelFiles, *, device: Any = None, dtype: Any = None, channels_last: bool | None = None,
         compile: bool | str = False, vae: str | os.PathLike | None = None,
         local_files_only: bool = False, token_downsampling: int = 1) -> TorchBackend:
    """Open a model directory (read by :func:`composekit.formats.model_source.read_model_dir`) onto ``device`` in ``dtype``.

    ``channels_last``: NHWC memory layout for the U-Net and VAE (None = on for CUDA, off on the CPU).
    ``compile``: ``torch.compile`` the U-Net (True, or a mode such as ``"reduce-overhead"``, which
    replays CUDA graphs, or ``"max-autotune"``); the first call compiles (minutes for a full model).
    ``vae``: an ``AutoencoderTiny`` folder whose decoder replaces the VAE's.
    ``token_downsampling``: 2..4 = the highest-resolution self-attentions take their keys and values from
    every N-th latent cell in each direction (a speed/quality trade; 1 = off, exact).
    """
    files = content
    dev = _device(device)
    dt = _dtype(dtype, dev)
    if dev.type == "cpu" and dt == torch.float16:
        logger.warning("float16 on CPU is slow and imprecise; float32 is recommended there")
    if channels_last is None:
        channels_last = dev.type == "cuda"
    channels_last = check_bool("channels_last", channels_last)
    if not isinstance(compile, bool):
        check_choice("compile", compile, ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    if vae is not None:  # a folder or Hub id of a diffusers AutoencoderTiny, found (or downloaded) like a model
        if not isinstance(vae, (str, os.PathLike)):
            raise InputError(f"vae={vae!r}: pass the folder or Hub id of a diffusers AutoencoderTiny (e.g. "
                             "madebyollin/taesd)")
        vae = resolve_source(vae, local_files_only=local_files_only, allow_patterns=TINY_VAE_ALLOW_PATTERNS)
    token_downsampling = check_integer("token_downsampling", token_downsampling, 1, MAX_TOKEN_DOWNSAMPLING)
    with _LOAD_LOCK:
        backend = TorchBackend(files, dev, dt, channels_last=channels_last, compile=compile,
                               token_downsampling=token_downsampling)
        if vae is not None:
            backend.use_tiny_vae(load_tiny_vae(vae, dev, dt, backend.info.latent_channels))
        return backend
