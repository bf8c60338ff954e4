"""One declarative spec per exported component, read by the exporter and by every runtime.

A spec names a graph's inputs and outputs, their dtypes and shapes (with named dynamic axes), makes
sample inputs, and gives TensorRT optimisation profiles (min/opt/max). No torch, no ONNX imports.

Components (``ModelDims`` fills in the numbers):

=================  ============================================  =====================================
component          inputs                                        outputs
=================  ============================================  =====================================
object_encoder     pixel_values (B, 3, C, C)                     context (B, T, D), uncond (B, T, D)
unet               sample (B, Cin, h, w), timestep (B,) int64,   noise_pred (B, 4, h, w),
                   encoder_hidden_states (B, T, D)               features (B, F, h, w) [feature caching]
unet_shallow       as unet, and features (B, F, h, w)            noise_pred (B, 4, h, w)
vae_encoder        image (B, 3, H, W) in [-1, 1]                 latent (B, 4, h, w), scaled mean
vae_decoder        latent (B, 4, h, w), scaled                   image (B, 3, H, W) in [-1, 1]
tiny_vae_decoder   as vae_decoder (optional: a tiny autoencoder's decoder, e.g. TAESD)
=================  ============================================  =====================================

Feature caching (``cache_interval``): when ``dims.feature_channels`` (F) is set, the U-Net graph also
outputs the deep features entering its last up layer, and the ``unet_shallow`` graph recomputes only
that layer (with ``conv_in`` and ``conv_out``) from features of an earlier step.

``B`` is dynamic everywhere (classifier-free guidance doubles the U-Net batch). ``H, W`` (and
``h, w``) are fixed at the model size unless the export asked for dynamic spatial axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from composekit.errors import InputError

__all__ = ["ModelDims", "TensorSpec", "ComponentSpec", "component_specs", "COMPONENT_NAMES", "OPTIONAL_COMPONENTS"]

COMPONENT_NAMES = ("object_encoder", "unet", "vae_encoder", "vae_decoder")
# Exported only on request: a tiny autoencoder's decoder (``--tiny-vae``), the vae_decoder's inputs and outputs.
OPTIONAL_COMPONENTS = ("tiny_vae_decoder", "unet_shallow")
Dim = int | str


@dataclass(frozen=True)
class ModelDims:
    """The numbers that fix every component's shapes."""

    model_size: int  # H = W, pixels
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int  # 4
    unet_in_channels: int  # 9 or 4
    context_tokens: int  # T: 1 (Paint by Example), 257 or 77 (ObjectStitch)
    context_dim: int  # D: 768 for SD 1.x
    clip_size: int = 224  # C
    feature_channels: int = 0  # F: channels of the features feature caching reuses (0 = no unet_shallow graph)

    @property
    def latent_size(self) -> int:
        return self.model_size // self.vae_scale_factor

    def to_dict(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelDims":
        return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]  # ints are fixed, strings are named dynamic axes
    dtype: str = "float"  # "float" follows the export precision; "int64" is fixed

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # dynamic axis name -> (min, opt, max) for TensorRT profiles
    ranges: Mapping[str, tuple[int, int, int]]
    scale: int = 8  # pixels per latent cell: relates the pixel axes (H, W) to the latent ones (h, w)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` argument."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}

    def sample_inputs(self, float_dtype: str = "float32", batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs at the profile's ``opt`` sizes (``batch`` overrides B)."""
        rng = np.random.default_rng(seed)
        sizes = {k: v[1] for k, v in self.ranges.items()}
        if batch is not None:
            sizes["B"] = batch
        out = {}
        for t in self.inputs:
            shape = t.concrete(sizes)
            if t.dtype == "int64":
                out[t.name] = rng.integers(0, 1000, shape).astype(np.int64)
            else:
                out[t.name] = rng.standard_normal(shape).astype(float_dtype)
        return out

    def sizes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """The dynamic axes' sizes for concrete input ``shapes``, checked against the spec and its ranges.

        Raises :class:`InputError` naming the input, the axis, the actual and the allowed size: a
        shape outside the range cannot run on an engine built from this spec's profile.
        """
        sizes: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in shapes:
                raise InputError(f"{self.name}: input {t.name!r} is missing; expected {self.input_names}")
            actual = tuple(int(d) for d in shapes[t.name])
            if len(actual) != len(t.shape):
                raise InputError(f"{self.name}: input {t.name!r} has shape {actual}; expected {t.shape}")
            for axis, (want, got) in enumerate(zip(t.shape, actual)):
                if isinstance(want, int) and want != got:
                    raise InputError(f"{self.name}: input {t.name!r} has shape {actual}; axis {axis} must be {want}")
                if isinstance(want, str):
                    if sizes.setdefault(want, got) != got:
                        raise InputError(f"{self.name}: axis {want} is {sizes[want]} in one input and {got} in "
                                         f"{t.name!r}; all inputs must agree")
                    lo, _, hi = self.ranges[want]
                    if not lo <= got <= hi:
                        raise InputError(
                            f"{self.name}: {want}={got} in input {t.name!r} is outside the exported range "
                            f"{lo}..{hi}; re-export (and rebuild engines) with a larger range"
                        )
        for big, small in (("H", "h"), ("W", "w")):  # pixel and latent axes determine each other
            if small in sizes:
                sizes.setdefault(big, sizes[small] * self.scale)
            if big in sizes:
                sizes.setdefault(small, sizes[big] // self.scale)
        return sizes

    def output_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Each output's concrete shape for concrete input ``shapes`` (checked as in :meth:`sizes`)."""
        sizes = self.sizes(shapes)
        return {t.name: t.concrete(sizes) for t in self.outputs}

    def trt_profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        return {
            t.name: tuple(t.concrete({k: v[i] for k, v in self.ranges.items()}) for i in range(3))  # type: ignore[misc]
            for t in self.inputs
        }


def component_specs(dims: ModelDims, dynamic_spatial: bool = False, max_batch: int = 2) -> dict[str, ComponentSpec]:
    """The four component specs for a model of ``dims``.

    ``max_batch`` is the most composites sampled together: the encoders and decoder take batches of
    1..max_batch, the U-Net 1..2 x max_batch (guidance doubles its batch). With ``dynamic_spatial``
    the image side may range over 256..1024 pixels (latent 32..128 for a factor of 8); otherwise it
    is fixed at ``dims.model_size``.
    """
    m, lat, f = dims.model_size, dims.latent_size, dims.vae_scale_factor
    c, t, d = dims.clip_size, dims.context_tokens, dims.context_dim
    batch = {"B": (1, 2, 2 * max_batch)}
    if dynamic_spatial:
        lo, hi = max(f * 4, m // 2), m * 2
        pix: tuple[Dim, Dim] = ("H", "W")
        latent: tuple[Dim, Dim] = ("h", "w")
        spatial = {"H": (lo, m, hi), "W": (lo, m, hi), "h": (lo // f, lat, hi // f), "w": (lo // f, lat, hi // f)}
    else:
        pix, latent, spatial = (m, m), (lat, lat), {}
    ranges = {**batch, **spatial}
    enc_batch = {"B": (1, 1, max_batch)}
    unet_inputs = (
        TensorSpec("sample", ("B", dims.unet_in_channels, *latent)),
        TensorSpec("timestep", ("B",), "int64"),
        TensorSpec("encoder_hidden_states", ("B", t, d)),
    )
    noise_pred = TensorSpec("noise_pred", ("B", dims.latent_channels, *latent))
    features = TensorSpec("features", ("B", dims.feature_channels, *latent))
    caching = {"unet_shallow": ComponentSpec("unet_shallow", inputs=(*unet_inputs, features), outputs=(noise_pred,),
                                             ranges=ranges, scale=f)} if dims.feature_channels else {}
    return {
        "object_encoder": ComponentSpec(
            "object_encoder",
            inputs=(TensorSpec("pixel_values", ("B", 3, c, c)),),
            outputs=(TensorSpec("context", ("B", t, d)), TensorSpec("uncond", ("B", t, d))),
            ranges=enc_batch,
            scale=f,
        ),
        "unet": ComponentSpec(
            "unet",
            inputs=unet_inputs,
            outputs=(noise_pred, features) if caching else (noise_pred,),
            ranges=ranges,
            scale=f,
        ),
        **caching,
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("image", ("B", 3, *pix)),),
            outputs=(TensorSpec("latent", ("B", dims.latent_channels, *latent)),),
            ranges={**enc_batch, **spatial},
            scale=f,
        ),
        **{name: ComponentSpec(
            name,
            inputs=(TensorSpec("latent", ("B", dims.latent_channels, *latent)),),
            outputs=(TensorSpec("image", ("B", 3, *pix)),),
            ranges={**enc_batch, **spatial},
            scale=f,
        ) for name in ("vae_decoder", "tiny_vae_decoder")},
    }
