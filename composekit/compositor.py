"""The public entry point: :class:`Compositor` and its result, :class:`CompositeResult`."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from . import geometry
from .backends import Backend, choose_backend, load_backend
from .errors import InputError, ModelError
from .images import load_picture, to_caller_kind
from .loading import read_model_dir, resolve_source
from .engines import is_engine_dir, read_engine_dir
from .manifest import is_export_dir, read_manifest
from .preprocess import ClipPreprocessor, flatten_cutout, require_visible
from .sampler import SamplerOptions, sample
from .scheduler import DDIMScheduler

__all__ = ["Compositor", "CompositeResult"]

logger = logging.getLogger(__name__)
_CONTEXT_CACHE_SIZE = 8  # objects whose encoded context is kept between calls


@dataclass(frozen=True)
class CompositeResult:
    """What :meth:`Compositor.paste` returns.

    Attributes:
        image: the composite, in the background's kind (PIL in -> PIL out, numpy in -> numpy out;
            paths and bytes give PIL) and mode (RGB, RGBA with the background's alpha, or L).
        mask: ``HxW`` bool array, True where pixels may differ from the background (the editable
            region). Everything else is bit-identical to the background.
        box: the region's bounding box ``(x0, y0, x1, y1)`` in background pixels.
        seed: the seed the noise was drawn from (drawn at random when the call gave none).
        steps, guidance: the sampler settings used.
        timings: seconds per stage (``encode_object``, ``encode_image``, ``denoise``, ``decode``,
            ``prepare``, ``paste``, ``total``).
    """

    image: Any
    mask: np.ndarray
    box: tuple[int, int, int, int]
    seed: int
    steps: int
    guidance: float
    timings: Mapping[str, float] = field(default_factory=dict)


def _seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _region(mask: Any, box: Any, width: int, height: int) -> tuple[geometry.Box, np.ndarray | None]:
    """The editable region as (box, mask cropped to the box or None for the whole box)."""
    if mask is None:
        if box is None:
            raise InputError("give a box=(x0, y0, x1, y1) or a mask= where the object should go")
        return geometry.validate_box(box, width, height), None
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    pic = load_picture(mask, "mask")
    if (pic.width, pic.height) != (width, height):
        raise InputError(
            f"mask is {pic.width}x{pic.height} but the background is {width}x{height}; they must match"
        )
    full = pic.rgb[..., 0] >= 128  # white (>= 0.5) = editable
    tight = geometry.mask_to_box(full)
    if box is not None:
        outer = geometry.validate_box(box, width, height)
        if not (outer[0] <= tight[0] and outer[1] <= tight[1] and outer[2] >= tight[2] and outer[3] >= tight[3]):
            raise InputError(f"mask extends outside the given box {outer}; drop box= or enlarge it")
    x0, y0, x1, y1 = tight
    return tight, full[y0:y1, x0:x1].copy()


class Compositor:
    """Generative object compositing with an exact-background guarantee.

    Build one with :meth:`from_pretrained` and call :meth:`paste`. A ``Compositor`` holds the loaded
    model and no per-call state, so one instance can serve several threads.
    """

    def __init__(self, backend: Backend | None = None, scheduler: DDIMScheduler | None = None,
                 preprocessor: ClipPreprocessor | None = None,
                 backdrop: tuple[int, int, int] = (255, 255, 255)) -> None:
        """``Compositor()`` with no model is the weights-free ``classic`` compositor; use
        :meth:`from_pretrained` for the generative one."""
        self.backend = backend
        self.scheduler = scheduler
        self.preprocessor = preprocessor
        self.backdrop = backdrop
        self._context_cache: OrderedDict[bytes, tuple[Any, Any]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        if self.backend is None:
            return "Compositor(method='classic', no model)"
        info = self.backend.info
        return (
            f"Compositor(model={info.source!r}, family={info.family!r}, backend={self.backend.name!r}, "
            f"device/dtype={self.backend.describe()!r}, size={info.model_size})"
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        backend: str = "auto",
        device: Any = None,
        dtype: Any = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **backend_options: Any,
    ) -> "Compositor":
        """Load a model from a local directory or a Hugging Face Hub repo id.

        Args:
            source: a directory in diffusers' Paint-by-Example layout, or a Hub repo id such as
                ``"Fantasy-Studio/Paint-by-Example"`` (downloaded once into the Hugging Face cache).
            backend: ``"auto"`` (default: by what ``source`` holds — engines -> tensorrt, an ONNX export
                -> onnxruntime, a diffusers model -> torch; the choice is logged), or one of those names,
                which always wins.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when torch sees a GPU.
                Asking for a GPU that is not there raises :class:`BackendUnavailableError`.
            dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None = float16 on CUDA, float32 on CPU.
            revision: Hub branch, tag or commit.
            local_files_only: never touch the network (also set by ``HF_HUB_OFFLINE=1``).
            backend_options: passed to the backend. ``onnxruntime``: ``providers`` (a list, wins over
                ``device``), ``intra_op_threads``, ``inter_op_threads``, ``graph_optimization``
                (``"disable" | "basic" | "extended" | "all"``), ``io_binding`` (default: on with CUDA).
                ``tensorrt``: ``cuda_graph`` (replay the U-Net step as a CUDA graph), ``verify_engines``.
                ``torch``: ``channels_last``, ``compile`` (see the backends page of the docs).
        """
        root = resolve_source(source, revision=revision, local_files_only=local_files_only)
        name = choose_backend(backend, root)
        # Engines carry their ONNX export's manifest; the backend checks engines and graphs as it loads them.
        manifest = (read_engine_dir(root).manifest if is_engine_dir(root)
                    else read_manifest(root, verify=False) if is_export_dir(root) else None)
        if manifest is not None:
            scheduler_cfg, extractor_cfg = manifest.scheduler, manifest.feature_extractor
            backdrop = manifest.cutout_backdrop
        else:
            files = read_model_dir(root)
            scheduler_cfg, extractor_cfg = files.configs["scheduler"], files.configs["feature_extractor"]
            backdrop = files.index.get("cutout_backdrop", [255, 255, 255])
        loaded = load_backend(name, root, device=device, dtype=dtype, **backend_options)
        scheduler = DDIMScheduler.from_config(scheduler_cfg)
        preprocessor = ClipPreprocessor.from_config(extractor_cfg)
        if not (isinstance(backdrop, list) and len(backdrop) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                        for v in backdrop)):
            raise ModelError(f"{root}: cutout_backdrop must be [r, g, b] in 0..255, got {backdrop!r}")
        logger.info("loaded %s with backend %s (%s)", root, name, loaded.describe())
        return cls(loaded, scheduler, preprocessor, tuple(backdrop))

    def paste(
        self,
        obj: Any,
        background: Any,
        box: Any = None,
        *,
        mask: Any = None,
        steps: int = 50,
        guidance: float = 5.0,
        eta: float = 0.0,
        seed: int | None = None,
        latents: Any = None,
        context: float = 2.0,
        feather: int | None = None,
        progress: bool = True,
        callback: Callable[[int, int, np.ndarray], None] | None = None,
        method: str | None = None,
        harmonize: float = 0.5,
        shadow: float = 0.35,
        guidance_end: float = 1.0,
        decode: str = "window",
    ) -> CompositeResult:
        """Paste ``obj`` into ``background`` at ``box`` (or ``mask``) and let the model harmonise it.

        Args:
            obj: The object (PIL image, ``HxWx3``/``HxWx4`` array, path or bytes). An alpha channel
                marks a cut-out (see ``composekit.preprocess``).
            background: The scene, any size, same kinds as ``obj``.
            box: ``(x0, y0, x1, y1)`` in background pixels, ``x1``/``y1`` exclusive.
            mask: Alternatively (or inside ``box``), an image or array the background's size whose
                white pixels (>= 128, or True for a bool array) are the editable region.
            steps: DDIM steps.
            guidance: Classifier-free guidance scale (<= 1 disables it).
            eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
            seed: Seed of all noise (drawn on the CPU); None draws one (reported in the result).
            latents: Initial noise ``(1, 4, M/8, M/8)`` to use instead of drawing it from ``seed``.
            context: Side of the square context window the model sees, in multiples of the box's
                longer side (>= 1).
            feather: Width in pixels of the soft edge inside the region; None = 1/16 of the box's
                shorter side (2 for the classic method); 0 = hard edge.
            progress: Show a tqdm progress bar.
            callback: Called as ``callback(step, timestep, latents)`` after every step, with the
                latents as a numpy array.
            method: ``"generative"`` (the model) or ``"classic"`` (no model: scale, colour-harmonise,
                feather and shadow the object in milliseconds; see ``composekit.classic``). None =
                generative when a model is loaded, classic otherwise.
            guidance_end: Fraction of the steps (from the start) that use classifier-free guidance;
                later steps run one conditional U-Net pass instead of two. 1.0 (default) guides
                every step, as the reference pipeline does.
            decode: ``"window"`` (default) decodes the whole context window, as the reference pipeline
                does; ``"region"`` decodes only the editable region's latent cells plus a 64-pixel
                margin (what is pasted back), which is cheaper when the region is small. The VAE
                decoder's attention sees the whole latent, so the result differs slightly (measured
                in docs/benchmarks.md). Needs a backend whose decoder takes any size (``torch``).
            harmonize: Classic method: colour-transfer strength, 0..1.
            shadow: Classic method: contact-shadow darkness, 0..1.

        Returns:
            A `CompositeResult`; pixels outside ``result.mask`` equal the background's exactly.

        Raises:
            InputError: An argument is invalid (the message says what was expected).
            NumericalError: NaN or inf appeared while sampling or decoding.
        """
        start = time.perf_counter()
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            raise InputError(f"steps must be an integer in [1, 1000], got {steps!r}")
        for name, value in (("guidance", guidance), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta!r}")
        if feather is not None and (isinstance(feather, bool) or not isinstance(feather, int) or feather < 0):
            raise InputError(f"feather must be a non-negative integer or None, got {feather!r}")
        seed = _seed(seed)
        method = method or ("generative" if self.backend is not None else "classic")
        if method not in ("generative", "classic"):
            raise InputError(f"method must be 'generative' or 'classic', got {method!r}")
        if method == "generative" and self.backend is None:
            raise InputError(
                "this Compositor has no model, so only method='classic' is available; load one with "
                "Compositor.from_pretrained('Fantasy-Studio/Paint-by-Example') for generative compositing"
            )
        if decode not in ("window", "region"):
            raise InputError(f"decode must be 'window' or 'region', got {decode!r}")
        if decode == "region" and self.backend is not None and not self.backend.info.any_size_decode:
            raise InputError(f"decode='region' needs a decoder that takes any latent size; the {self.backend.name} "
                             "backend's exported decoder has a fixed size. Use decode='window' or backend='torch'")
        for name, value in (("harmonize", harmonize), ("shadow", shadow), ("guidance_end", guidance_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be a number in 0..1, got {value!r}")

        bg = load_picture(background, "background")
        ob = load_picture(obj, "object")
        require_visible(ob.alpha)
        region_box, region_mask = _region(mask, box, bg.width, bg.height)
        if method == "classic":
            return self._classic(bg, ob, region_box, region_mask, seed, start, feather, harmonize, shadow)
        info = self.backend.info

        # Geometry: context window, model-space hole, object tensor.
        window = geometry.plan_window(region_box, bg.width, bg.height, info.model_size, context)
        window_pixels = geometry.crop_window(bg.rgb, window)
        hole = geometry.model_hole(region_box, window, info.vae_scale_factor, region_mask)
        object_pixels = self.preprocessor(flatten_cutout(ob.rgb, ob.alpha, self.backdrop))
        prepared = time.perf_counter()

        out = sample(
            self.backend,
            self.scheduler,
            window_pixels,
            hole,
            object_pixels,
            SamplerOptions(steps=int(steps), guidance=float(guidance), eta=float(eta), seed=seed,
                           guidance_end=float(guidance_end), decode=decode, progress=progress,
                           callback=callback),
            latents=latents,
            encode_object=self._object_context,
        )

        # Paste back only the editable region, with the soft edge inside it.
        pasted = time.perf_counter()
        x0, y0, x1, y1 = region_box
        region = region_mask if region_mask is not None else np.ones((y1 - y0, x1 - x0), bool)
        radius = geometry.default_feather(region_box) if feather is None else feather
        alpha = geometry.feather_alpha(region, radius)
        composite = geometry.paste_back(bg.rgb, out.image, window, region_box, alpha)
        full_mask = np.zeros((bg.height, bg.width), bool)
        full_mask[y0:y1, x0:x1] = alpha > 0
        end = time.perf_counter()

        timings = dict(out.timings)
        timings.update(prepare=prepared - start, paste=end - pasted, total=end - start)
        return CompositeResult(
            image=to_caller_kind(composite, bg),
            mask=full_mask,
            box=region_box,
            seed=seed,
            steps=int(steps),
            guidance=float(guidance),
            timings=MappingProxyType(timings),
        )

    def _object_context(self, pixels: np.ndarray) -> tuple[Any, Any]:
        """The object's (cond, uncond) context, cached for the last few objects (same pixels, same result).

        Entries are read-only backend arrays; the lock only guards the cache's bookkeeping, so
        concurrent calls for different objects still encode in parallel.
        """
        key = hashlib.sha256(pixels.tobytes()).digest()
        with self._cache_lock:
            hit = self._context_cache.get(key)
            if hit is not None:
                self._context_cache.move_to_end(key)
                return hit
        context = self.backend.encode_object(pixels)
        with self._cache_lock:
            self._context_cache[key] = context
            while len(self._context_cache) > _CONTEXT_CACHE_SIZE:
                self._context_cache.popitem(last=False)
        return context

    def _classic(self, bg, ob, region_box, region_mask, seed: int, start: float, feather: int | None,
                 harmonize: float, shadow: float) -> CompositeResult:
        from .classic import classic_composite

        x0, y0, x1, y1 = region_box
        radius = 2 if feather is None else feather
        composite, changed = classic_composite(bg.rgb, ob.rgb, ob.alpha, region_box, region_mask,
                                               harmonize=harmonize, shadow=shadow, feather=radius)
        full_mask = np.zeros((bg.height, bg.width), bool)
        full_mask[y0:y1, x0:x1] = changed
        total = time.perf_counter() - start
        return CompositeResult(image=to_caller_kind(composite, bg), mask=full_mask, box=region_box, seed=seed,
                               steps=0, guidance=0.0, timings=MappingProxyType({"classic": total, "total": total}))
