"""The small interface every backend implements; the sampler is written against it alone.

Arrays passed in and out are the backend's own type (``torch.Tensor`` on the torch backend, numpy or
device buffers elsewhere). The sampler only combines them with ``+ - * /``, slicing, ``.clip`` and
:meth:`Backend.cat`, so latents stay on the backend's device for the whole loop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

import numpy as np

from composekit.errors import BackendUnavailableError, ComposekitError, ModelError

__all__ = ["Backend", "ModelCard", "ModelInfo", "model_call"]

F = TypeVar("F", bound=Callable[..., Any])


def model_call(component: str) -> Callable[[F], F]:
    """Decorate a backend's model call so a failure inside the runtime surfaces as a composekit error.

    Out-of-memory becomes :class:`BackendUnavailableError`; anything else the runtime raises (a
    config that built a module which cannot run, a graph that rejects its inputs) becomes
    :class:`ModelError` naming the component, with the original exception chained.
    """
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ComposekitError:
                raise
            except MemoryError as exc:
                raise BackendUnavailableError(f"out of memory running the {component}; free memory, use a smaller "
                                              "context or a lower precision") from exc
            except Exception as exc:  # torch, onnxruntime and TensorRT raise their own types
                if "out of memory" in str(exc).lower():
                    raise BackendUnavailableError(f"out of memory running the {component} ({exc}); free device "
                                                  "memory, or use dtype='float16' / a smaller batch") from exc
                raise ModelError(f"the {component} failed to run: {type(exc).__name__}: {exc}. The model's config "
                                 "or graph may be corrupt; restore or re-export it (if it is intact, please "
                                 "report this)") from exc
        return call  # type: ignore[return-value]
    return wrap


@dataclass(frozen=True)
class ModelInfo:
    """What the sampler needs to know about the loaded model."""

    family: str  # "paint_by_example"
    model_size: int  # generated image side in pixels (unet sample_size * vae_scale_factor)
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int  # 4 for SD
    unet_in_channels: int  # 9 (latent + masked latent + mask) or 4 (plain SD U-Net)
    source: str  # where the model was loaded from
    any_size_decode: bool = False  # the decoder accepts latents of any spatial size (decode="region")
    max_batch: int | None = None  # most composites per batch (exports: fixed at export; None = no limit)
    feature_channels: int = 0  # channels of the features feature caching reuses (0: the model cannot cache)
    token_downsampling: int = 1  # keys/values of the highest-resolution self-attentions from every N-th cell (1: off)

    @property
    def feature_cache(self) -> bool:
        """Whether the backend has the full-with-features and shallow U-Net passes (``cache_interval > 1``)."""
        return self.feature_channels > 0

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """The shape of the model's latents: ``(batch, latent channels, side / f, side / f)``."""
        side = self.model_size // self.vae_scale_factor
        return (batch, self.latent_channels, side, side)

    @classmethod
    def from_manifest(cls, manifest: Any, source: str) -> "ModelInfo":
        """From an export's manifest (exported decoders have a fixed size; batches are bounded)."""
        dims = manifest.dims
        return cls(family=manifest.family, model_size=dims.model_size, vae_scale_factor=dims.vae_scale_factor,
                   latent_channels=dims.latent_channels, unet_in_channels=dims.unet_in_channels, source=source,
                   max_batch=manifest.max_batch,
                   feature_channels=dims.feature_channels,  # nonzero exactly when unet_shallow is there (checked)
                   token_downsampling=manifest.token_downsampling)


@dataclass(frozen=True)
class ModelCard:
    """What a backend read when it opened its directory, beside the weights: everything the compositor needs."""

    info: ModelInfo
    scheduler: dict[str, Any]  # the scheduler config (diffusers' scheduler_config.json keys)
    feature_extractor: dict[str, Any]  # the CLIP image processor config
    backdrop: tuple[int, int, int]  # the colour behind a cut-out object (family-specific)

    @classmethod
    def from_manifest(cls, manifest: Any, source: str) -> "ModelCard":
        """From an export's manifest (an engine directory carries its export's)."""
        return cls(ModelInfo.from_manifest(manifest, source), manifest.scheduler, manifest.feature_extractor,
                   tuple(manifest.cutout_backdrop))  # type: ignore[arg-type]


@runtime_checkable
class Backend(Protocol):
    """Four model calls (the U-Net's in three forms: plain, with features, shallow) plus the array plumbing
    the sampler needs."""

    name: str
    info: ModelInfo
    card: ModelCard

    def describe(self) -> str:
        """Device and dtype, for ``repr`` and logs, e.g. ``"cpu, float32"``."""

    def asarray(self, x: np.ndarray) -> Any:
        """A host float32 array on the backend's device, in its compute dtype."""

    def to_numpy(self, x: Any) -> np.ndarray:
        """A backend array back on the host as float32 numpy."""

    def cat(self, xs: list[Any], axis: int) -> Any:
        """Concatenate backend arrays along ``axis``."""

    def encode_object(self, pixels: np.ndarray) -> tuple[Any, Any]:
        """CLIP pixels ``(B, 3, C, C)`` -> (object contexts ``(B, T, D)``, unconditional contexts ``(B, T, D)``)."""

    def encode_image(self, image: Any) -> Any:
        """Images ``(B, 3, M, M)`` in ``[-1, 1]`` -> scaled latents ``(B, 4, M/f, M/f)`` (posterior mean)."""

    def unet(self, sample: Any, timestep: int, context: Any) -> Any:
        """Noise prediction for ``sample`` ``(B, C_in, h, w)`` at ``timestep`` with ``context`` ``(B, T, D)``."""

    def unet_with_features(self, sample: Any, timestep: int, context: Any) -> tuple[Any, Any]:
        """A full U-Net pass that also returns the deep features ``(B, info.feature_channels, h, w)`` that enter
        its last up layer (feature caching; only when ``info.feature_cache``)."""

    def unet_shallow(self, sample: Any, timestep: int, context: Any, features: Any) -> Any:
        """The shallow pass: noise prediction from ``features`` of an earlier full pass (``conv_in``, the last
        up layer, ``conv_out``; only when ``info.feature_cache``)."""

    def decode(self, latents: Any, tiny: bool = False) -> Any:
        """Scaled latents ``(B, 4, h, w)`` -> images ``(B, 3, f h, f w)`` in ``[-1, 1]`` (not clipped). ``tiny``: with
        the tiny decoder when the backend holds one beside the VAE's (an export made with ``--tiny-vae``)."""

    def synchronize(self) -> None:
        """Wait for queued device work (for honest stage timings)."""
