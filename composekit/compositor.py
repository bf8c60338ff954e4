"""The public entry point: [`Compositor`][composekit.Compositor] and its result, [`CompositeResult`][composekit.CompositeResult]."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from composekit.backends import Backend, choose_backend, open_backend
from composekit.backends.context_cache import ContextCache
from composekit.core import geometry
from composekit.core.devices import KINDS, parse_device
from composekit.core.options import (
    SEED,
    ClassicOptions,
    GenerativeOptions,
    PasteOptions,
    check_choice,
    check_integer,
    not_for_method,
    resolve,
)
from composekit.core.preprocess import ClipPreprocessor, flatten_cutout, require_visible
from composekit.core.sampler import Job, check_latents, sample_batch
from composekit.core.scheduler import DDIMScheduler
from composekit.errors import BackendUnavailableError, ComposekitError, InputError, install_hint
from composekit.formats.images import load_picture, to_caller_kind
from composekit.formats.model_source import resolve_source

__all__ = ["Compositor", "CompositeResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompositeResult:
    """What [`Compositor.paste`][composekit.Compositor.paste] returns.

    Attributes:
        image: the composite, in the background's kind (PIL in -> PIL out, numpy in -> numpy out;
            paths and bytes give PIL) and mode (RGB, RGBA with the background's alpha, or L).
        mask: ``HxW`` bool array, True where pixels may differ from the background (the editable
            region). Everything else is bit-identical to the background.
        box: the region's bounding box ``(x0, y0, x1, y1)`` in background pixels (with several
            objects, the box around all of them).
        seed: the seed the noise was drawn from (drawn at random when the call gave none); None for the
            classic method, which draws no noise.
        steps, guidance: the sampler settings used (0 for the classic method).
        timings: seconds per stage (``encode_object``, ``encode_image``, ``denoise``, ``decode``,
            ``prepare``, ``paste``, ``total``; ``classic``, ``total`` for the classic method), summed
            over the objects.
        method: ``"generative"`` or ``"classic"``.
        seeds: each object's seed (the first is ``seed``); empty for the classic method.
        boxes: each object's region box.
    """

    image: Any
    mask: np.ndarray
    box: tuple[int, int, int, int]
    seed: int | None
    steps: int
    guidance: float
    timings: Mapping[str, float] = field(default_factory=dict)
    method: str = "generative"
    seeds: tuple[int, ...] = ()
    boxes: tuple[tuple[int, int, int, int], ...] = ()


def _seed(seed: Any) -> int:
    """The caller's seed, checked, or a fresh random one."""
    seed = SEED.check(seed)
    return secrets.randbits(63) if seed is None else seed


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

    Build one with [`from_pretrained`][composekit.Compositor.from_pretrained] and call [`paste`][composekit.Compositor.paste]. A ``Compositor`` holds the loaded
    model and no per-call state, so one instance can serve several threads.
    """

    def __init__(self, backend: Backend | None = None, scheduler: DDIMScheduler | None = None,
                 preprocessor: ClipPreprocessor | None = None,
                 backdrop: tuple[int, int, int] = (255, 255, 255)) -> None:
        """``Compositor()`` with no model is the weights-free ``classic`` compositor; use
        [`from_pretrained`][composekit.Compositor.from_pretrained] for the generative one."""
        # The sampler encodes objects through the backend; the cache answers repeated objects from memory.
        self.backend = backend if backend is None or isinstance(backend, ContextCache) else ContextCache(backend)
        self.scheduler = scheduler
        self.preprocessor = preprocessor
        self.backdrop = backdrop

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
        vae: str | os.PathLike | None = None,
        **backend_options: Any,
    ) -> "Compositor":
        """Load a model from a local directory or a Hugging Face Hub repo id.

        Args:
            source: a directory in diffusers' Paint-by-Example layout, or a Hub repo id such as
                ``"Fantasy-Studio/Paint-by-Example"`` (downloaded once into the Hugging Face cache).
            backend: ``"auto"`` (default: by what ``source`` holds — engines -> tensorrt, a diffusers
                model -> torch, an ONNX export -> onnxruntime with CUDA, else openvino when installed,
                else onnxruntime; the choice is logged with why), or one of those names, which always wins.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when torch sees a GPU.
                Asking for a GPU that is not there raises [`BackendUnavailableError`][composekit.errors.BackendUnavailableError].
            dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None = float16 on CUDA, float32 on CPU.
            revision: Hub branch, tag or commit.
            local_files_only: never touch the network (also set by ``HF_HUB_OFFLINE=1``).
            vae: a tiny autoencoder to decode with, a speed option (decode ~1% of the VAE's compute; its
                quality is the published model's). For a diffusers model (torch): the folder or Hub id of
                a diffusers ``AutoencoderTiny``, e.g. ``"madebyollin/taesd"``; for an export (onnxruntime,
                openvino): ``"tiny"``, the tiny decoder exported beside the VAE (``--tiny-vae``).
            backend_options: passed to the backend. ``onnxruntime``: ``providers`` (a list, wins over
                ``device``), ``intra_op_threads``, ``inter_op_threads``, ``graph_optimization``
                (``"disable" | "basic" | "extended" | "all"``), ``io_binding`` (default: on with CUDA).
                ``openvino``: ``precision`` (``"f32" | "bf16" | "f16"``; default bf16 where the CPU has
                it), ``threads``, ``cache_dir`` (compiled-model cache; False = off).
                ``tensorrt``: ``cuda_graph`` (replay the U-Net step as a CUDA graph), ``verify_engines``.
                ``torch``: ``channels_last``, ``compile``, ``token_downsampling`` (2..4: the highest-resolution
                self-attentions take keys and values from every N-th latent cell, a speed/quality trade; an
                export has it traced in instead) (see the backends page of the docs).
        """
        device = parse_device(device, backend="composekit", allowed=tuple(KINDS))  # parsed once, here
        if backend in ("auto", "torch") and not Path(source).exists():
            # A Hub repo holds a diffusers model, which only the torch backend opens: say so before a download.
            missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
            if missing:
                raise BackendUnavailableError(f"{source} is not a local directory, so it would be downloaded from the "
                                              f"Hugging Face Hub as a diffusers model, which needs {', '.join(missing)}; "
                                              f"{install_hint('torch')}")
        root = resolve_source(source, revision=revision, local_files_only=local_files_only)
        # The directory is read once (by its marker's reader) and opened by the chosen backend, which
        # returns itself with its card: model info, scheduler and feature-extractor configs, backdrop.
        name, content = choose_backend(backend, root, device)
        # Every loader takes device, dtype, vae and local_files_only; each handles vae its own way.
        loaded = open_backend(name, content, device=device, dtype=dtype, vae=vae, local_files_only=local_files_only,
                              **backend_options)
        logger.info("loaded %s with backend %s (%s)", root, name, loaded.describe())
        return cls._from_backend(loaded)

    def _compute(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` where the backend wants its work done: the torch backend runs all of it on one thread
        per process (OpenMP speed does not then depend on the calling thread); the others on the caller's."""
        compute = getattr(self.backend, "compute", None)
        return compute(fn, *args) if compute is not None else fn(*args)

    @classmethod
    def _from_backend(cls, loaded: Backend) -> "Compositor":
        """A compositor over an opened backend, with the scheduler, preprocessor and backdrop its card gives."""
        card = loaded.card
        scheduler = DDIMScheduler.from_config(card.scheduler)
        preprocessor = ClipPreprocessor.from_config(card.feature_extractor)
        # cutout_backdrop was checked against its schema when the index or manifest was read (composekit.formats.safe_json)
        return cls(loaded, scheduler, preprocessor, card.backdrop)

    def paste(
        self,
        obj: Any,
        background: Any,
        box: Any = None,
        *,
        mask: Any = None,
        seed: int | None = None,
        latents: Any = None,
        callback: Callable[[int, int, np.ndarray], None] | None = None,
        method: str | None = None,
        options: PasteOptions | None = None,
        **option_values: Any,
    ) -> CompositeResult:
        """Paste ``obj`` into ``background`` at ``box`` (or ``mask``) and let the model harmonise it.

        Args:
            obj: The object (PIL image, ``HxWx3``/``HxWx4`` array, path or bytes). An alpha channel
                marks a cut-out (see ``composekit.core.preprocess``). A list of objects pastes them one
                after another (then ``box``/``mask`` are lists of the same length): each sees the
                earlier ones in its context window, and later objects cover earlier ones where their
                regions overlap.
            background: The scene, any size, same kinds as ``obj``.
            box: ``(x0, y0, x1, y1)`` in background pixels, ``x1``/``y1`` exclusive.
            mask: Alternatively (or inside ``box``), an image or array the background's size whose
                white pixels (>= 128, or True for a bool array) are the editable region.
            seed: Seed of all noise (drawn on the CPU); None draws one (reported in the result). With
                several objects, object ``i > 0`` uses a seed derived from it (``result.seeds``).
            latents: Initial noise ``(1, 4, M/8, M/8)`` to use instead of drawing it from ``seed``
                (one object only).
            callback: Called as ``callback(step, timestep, latents)`` after every step, with the
                latents as a numpy array.
            method: ``"generative"`` (the model) or ``"classic"`` (no model: scale, colour-harmonise,
                feather and shadow the object in milliseconds; see ``composekit.core.classic``). None =
                generative when a model is loaded, classic otherwise.
            options: A [`GenerativeOptions`][composekit.core.options.GenerativeOptions] or
                [`ClassicOptions`][composekit.core.options.ClassicOptions] instead of the keyword options above
                (not both).

        Returns:
            A `CompositeResult`; pixels outside ``result.mask`` equal the background's exactly.

        Raises:
            InputError: An argument is invalid (the message says what was expected).
            NumericalError: NaN or inf appeared while sampling or decoding.
        """
        start = time.perf_counter()
        method, opts = self._options(method, options, option_values)
        if method == "classic" and seed is not None:
            raise InputError(not_for_method("seed", "classic"))

        bg = load_picture(background, "background")
        objects, boxes, masks = _jobs(obj, box, mask)
        if latents is not None and len(objects) > 1:
            raise InputError("latents= sets one object's initial noise; with several objects pass seed= instead")
        pictures = []
        for i, item in enumerate(objects):
            ob = load_picture(item, "object" if len(objects) == 1 else f"object {i}")
            require_visible(ob.alpha)
            pictures.append(ob)
        if method == "generative":  # the classic method draws no noise: no seeds
            seed = _seed(seed)
            seeds = [seed] + [_derived_seed(seed, i) for i in range(1, len(objects))]
        else:
            seeds = []
        regions = [_object_region(ob, b, m, bg, opts) for ob, b, m in zip(pictures, boxes, masks)]

        rgb = bg.rgb
        changes = []
        timings: dict[str, float] = {}
        for i, (ob, (region_box, region_mask)) in enumerate(zip(pictures, regions)):
            if method == "classic":
                rgb, changed, stage = self._classic(rgb, ob, region_box, region_mask, opts)
            else:
                rgb, changed, stage = self._generate(rgb, ob, region_box, region_mask, seeds[i], opts, latents,
                                                     callback)
            changes.append((region_box, changed))
            for key, value in stage.items():
                timings[key] = timings.get(key, 0.0) + value
        timings["total"] = time.perf_counter() - start
        return _composite_result(bg, rgb, changes, seeds, method, opts, timings)

    def _options(self, method: str | None, options: Any, given: dict[str, Any]) -> tuple[str, PasteOptions]:
        """The method and its validated options, from ``options=`` or from the keyword values as passed."""
        if options is not None:
            if not isinstance(options, (GenerativeOptions, ClassicOptions)):
                raise InputError(f"options must be a GenerativeOptions or ClassicOptions, got {type(options).__name__}")
            if given:
                raise InputError(f"pass either options= or keyword options, not both (got options= and "
                                 f"{sorted(given)})")
            if method is not None and method != options.method:
                raise InputError(f"method={method!r} does not match options of type {type(options).__name__}")
            method = options.method
        method = check_choice("method", method, ("generative", "classic"), nullable=True) or (
            "generative" if self.backend is not None else "classic")
        if method == "generative" and self.backend is None:
            raise InputError(
                "this Compositor has no model, so only method='classic' is available; load one with "
                "Compositor.from_pretrained('Fantasy-Studio/Paint-by-Example') for generative compositing"
            )
        if options is None:
            options = resolve(method, given)
        if method == "generative":
            if options.decode == "region" and not self.backend.info.any_size_decode:
                raise InputError(f"decode='region' needs a decoder that takes any latent size; the "
                                 f"{self.backend.name} backend's exported decoder has a fixed size. Use "
                                 "decode='window', or backend='openvino' or 'torch'")
            if options.cache_interval > 1 and not self.backend.info.feature_cache:
                raise InputError(f"cache_interval={options.cache_interval}"
                                 f"{' (set by speed=' + repr(options.speed) + ')' if options.speed != 'default' else ''}"
                                 " needs the U-Net's shallow pass, which "
                                 f"{self.backend.info.source} lacks (an export made before feature caching, or a "
                                 "U-Net that cannot be split). Re-export it with `composekit-export onnx` (and "
                                 "rebuild engines), or use cache_interval=1")
            limit = self.scheduler.max_steps()
            if options.steps > limit:
                raise InputError(f"steps={options.steps} is more than this model's schedule allows ({limit}); "
                                 f"use at most {limit}")
        return method, options

    def _prepare(self, rgb: np.ndarray, ob: Any, region_box: geometry.Box, region_mask: np.ndarray | None,
                 seed: int, opts: GenerativeOptions, latents: Any = None) -> "_Prepared":
        """One object's sampler job: context window, model-space hole, object tensor (and the naive paste)."""
        start = time.perf_counter()
        info = self.backend.info
        height, width = rgb.shape[:2]
        window = geometry.plan_window(region_box, width, height, info.model_size, opts.context)
        window_pixels = geometry.crop_window(rgb, window)
        hole = geometry.model_hole(region_box, window, info.vae_scale_factor, region_mask)
        object_pixels = self.preprocessor(flatten_cutout(ob.rgb, ob.alpha, self.backdrop))
        guide = None
        if opts.ilvr is not None:
            # The naive paste y (the object placed in the box as the classic method places it, no colour
            # transfer, no shadow, hard edge), seen through the same window: fidelity control's target.
            from composekit.core.classic import classic_composite

            naive, _ = classic_composite(rgb, ob.rgb, ob.alpha, region_box, region_mask, harmonize=0.0, shadow=0.0,
                                         feather=0)
            guide = geometry.crop_window(naive, window)
        job = Job(window_pixels, hole, object_pixels, seed, guide,
                  None if latents is None else check_latents(latents, info.latent_shape()))
        return _Prepared(rgb, region_box, region_mask, window, job, time.perf_counter() - start)

    def _finish(self, prep: "_Prepared", out: Any, opts: GenerativeOptions
                ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Paste back only the editable region, with the soft edge inside it: (pixels, changed, timings)."""
        pasted = time.perf_counter()
        x0, y0, x1, y1 = prep.region_box
        region = prep.region_mask if prep.region_mask is not None else np.ones((y1 - y0, x1 - x0), bool)
        radius = geometry.default_feather(prep.region_box) if opts.feather is None else opts.feather
        alpha = geometry.feather_alpha(region, radius)
        composite = geometry.paste_back(prep.rgb, out.image, prep.window, prep.region_box, alpha)
        timings = dict(out.timings)
        timings.update(prepare=prep.seconds, paste=time.perf_counter() - pasted)
        return composite, alpha > 0, timings

    def _generate(self, rgb: np.ndarray, ob: Any, region_box: geometry.Box, region_mask: np.ndarray | None,
                  seed: int, opts: GenerativeOptions, latents: Any, callback: Any
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """One object, generated: (new background pixels, changed pixels of the box, stage timings)."""
        prep = self._prepare(rgb, ob, region_box, region_mask, seed, opts, latents)
        out = self._compute(sample_batch, self.backend, self.scheduler, [prep.job], opts, callback)[0]
        if isinstance(out, ComposekitError):
            raise out
        return self._finish(prep, out, opts)

    # -- many composites ----------------------------------------------------------------------------

    def paste_batch(self, jobs: Iterable[Any], *, batch_size: int = 4, method: str | None = None,
                    options: PasteOptions | None = None,
                    callback: Callable[[int, int, np.ndarray], None] | None = None, **option_values: Any) -> list[Any]:
        """Many independent composites, sampled together; returns one entry per job, in order.

        Each job is a mapping with keys ``object``, ``background`` and ``box`` and/or ``mask``, and
        optionally ``seed`` (drawn when absent; generative only), or a tuple ``(object, background, box)`` /
        ``(object, background, box, seed)``. ``method``, ``options`` and ``option_values`` are
        [`paste`][composekit.Compositor.paste]'s (``steps``, ``guidance``, ``fidelity``, ``region``, ...),
        shared by every job; ``progress`` defaults to False here, and ``callback(step, timestep, latents)``
        sees each batch's latents ``(B, 4, h, w)`` (the jobs that reached the sampler, in order).

        Up to ``batch_size`` jobs run as one batch: one object-encoder and one VAE-encoder call for all of
        them, one U-Net call per step (``2 x batch_size`` rows with guidance), one decode. Each result
        equals the same job's [`paste`][composekit.Compositor.paste] with the same seed up to the runtime's rounding at another
        batch size (tested: latents within 1e-5 in fp32, images within 1/255; the background is
        bit-identical). A job that fails — a bad image, a box outside its background, NaN in its
        latents — is returned as its [`ComposekitError`][composekit.errors.ComposekitError] in its place; the others are unaffected.
        Every result's ``timings`` are its batch's stage times.

        Exported models and engines take batches up to the size they were exported for
        (``composekit-export onnx --max-batch N``).
        """
        return list(self.paste_stream(jobs, batch_size=batch_size, method=method, options=options, callback=callback,
                                      **option_values))

    def paste_stream(self, jobs: Iterable[Any], *, batch_size: int = 4, method: str | None = None,
                     options: PasteOptions | None = None,
                     callback: Callable[[int, int, np.ndarray], None] | None = None, **option_values: Any
                     ) -> Iterator[Any]:
        """[`paste_batch`][composekit.Compositor.paste_batch] as an iterator: jobs are read lazily and results come out as each batch
        finishes, so memory is bounded by ``batch_size`` whatever the number of jobs."""
        batch_size = check_integer("batch_size", batch_size, 1, 256)
        per_job = sorted(set(option_values) & {"object", "background", "box", "mask", "seed", "latents"})
        if per_job:
            raise InputError(f"paste_batch takes no option(s) {per_job}; per-job values (object, background, box, "
                             "mask, seed) go in the jobs")
        if options is None:
            option_values.setdefault("progress", False)
        method, opts = self._options(method, options, option_values)
        limit = self.backend.info.max_batch if self.backend is not None else None
        if method == "generative" and limit is not None and batch_size > limit:
            raise InputError(f"batch_size={batch_size}, but this {self.backend.name} model takes at most {limit} "
                             f"composites per batch; pass batch_size<={limit} or re-export with --max-batch {batch_size}")
        iterator = iter(jobs)
        while True:
            chunk = list(itertools.islice(iterator, batch_size))
            if not chunk:
                return
            yield from self._run_batch(chunk, method, opts, callback)

    def _run_batch(self, chunk: list[Any], method: str, opts: PasteOptions, callback: Any) -> list[Any]:
        """One batch: prepare each job (failures are kept in place), sample the good ones together, finish."""
        results: list[Any] = [None] * len(chunk)
        prepared: dict[int, tuple[Any, _Prepared, int]] = {}
        for i, raw in enumerate(chunk):
            try:
                item = _batch_job(raw)
                if method == "classic":
                    results[i] = self.paste(item["object"], item["background"], item.get("box"), mask=item.get("mask"),
                                            seed=item.get("seed"), options=opts)
                    continue
                seed = _seed(item.get("seed"))
                bg = load_picture(item["background"], "background")
                ob = load_picture(item["object"], "object")
                require_visible(ob.alpha)
                region_box, region_mask = _object_region(ob, item.get("box"), item.get("mask"), bg, opts)
                prepared[i] = (bg, self._prepare(bg.rgb, ob, region_box, region_mask, seed, opts), seed)
            except ComposekitError as exc:
                results[i] = exc
        if prepared:
            rows = sorted(prepared)
            outs = self._compute(sample_batch, self.backend, self.scheduler, [prepared[i][1].job for i in rows], opts,
                                 callback)
            for i, out in zip(rows, outs):
                bg, prep, seed = prepared[i]
                if isinstance(out, ComposekitError):
                    results[i] = out
                    continue
                rgb, changed, timings = self._finish(prep, out, opts)
                timings["total"] = sum(timings.values())
                results[i] = _composite_result(bg, rgb, [(prep.region_box, changed)], [seed], "generative", opts,
                                               timings)
        return results

    def _classic(self, rgb: np.ndarray, ob: Any, region_box: geometry.Box, region_mask: np.ndarray | None,
                 opts: ClassicOptions) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """One object, the weights-free way: (new background pixels, changed pixels of the box, timings)."""
        from composekit.core.classic import classic_composite

        start = time.perf_counter()
        if ob.alpha is None and region_mask is None:
            logger.warning("the object has no alpha channel, so the classic method pastes its whole rectangle into the "
                           "box (its own background too); use a cut-out (PNG or WebP with transparency) to paste only "
                           "the object")
        radius = 2 if opts.feather is None else opts.feather
        composite, changed = classic_composite(rgb, ob.rgb, ob.alpha, region_box, region_mask,
                                               harmonize=opts.harmonize, shadow=opts.shadow, feather=radius)
        return composite, changed, {"classic": time.perf_counter() - start}


def _object_region(ob: Any, box: Any, mask: Any, bg: Any, opts: PasteOptions
                   ) -> tuple[geometry.Box, np.ndarray | None]:
    """One object's editable region: its box (or mask), or with ``region="silhouette"`` its grown alpha."""
    try:
        region_box, region_mask = _region(mask, box, bg.width, bg.height)
    except InputError as exc:
        if box is not None and "outside" in str(exc) and _fits(box, ob.width, ob.height) and \
                ob.width * ob.height > bg.width * bg.height:
            raise InputError(f"{exc}. The box fits the object ({ob.width}x{ob.height}) instead: are the object and "
                             "the background swapped? The object comes first, then the background") from None
        raise
    if opts.region == "silhouette":
        if mask is not None:
            raise InputError("region='silhouette' makes the region from the object's alpha; drop mask= "
                             "(or use region='box' with your mask)")
        grow = geometry.default_margin(region_box) if opts.margin is None else opts.margin
        region_mask = geometry.silhouette_region(ob.alpha, region_box, grow)
    return region_box, region_mask


def _composite_result(bg: Any, rgb: np.ndarray, changes: list[tuple[geometry.Box, np.ndarray]], seeds: list[int],
                      method: str, opts: Any, timings: dict[str, float]) -> CompositeResult:
    """The result of one composite: ``changes`` are each object's (box, changed pixels of the box)."""
    mask = np.zeros((bg.height, bg.width), bool)
    for (x0, y0, x1, y1), changed in changes:
        mask[y0:y1, x0:x1] |= changed
    boxes = tuple(box for box, _ in changes)
    union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    generative = method == "generative"
    return CompositeResult(image=to_caller_kind(rgb, bg), mask=mask, box=union, seed=seeds[0] if seeds else None,
                           steps=opts.steps if generative else 0, guidance=opts.guidance if generative else 0.0,
                           timings=MappingProxyType(timings), method=method, seeds=tuple(seeds), boxes=boxes)


def _derived_seed(seed: int, index: int) -> int:
    """The seed of object ``index`` (> 0) of a several-object call: a 63-bit hash of (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _fits(box: Any, width: int, height: int) -> bool:
    try:
        geometry.validate_box(box, width, height)
    except InputError:
        return False
    return True


def _is_box(value: Any) -> bool:
    return isinstance(value, (tuple, list, np.ndarray)) and len(value) == 4 and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)


def _jobs(obj: Any, box: Any, mask: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """(objects, boxes, masks), one entry per object: one object, or a list of them with lists of regions."""
    if not isinstance(obj, (list, tuple)):
        return [obj], [box], [mask]
    n = len(obj)
    if n == 0:
        raise InputError("the list of objects is empty; pass at least one object")
    if n > MAX_OBJECTS:
        raise InputError(f"{n} objects in one call; at most {MAX_OBJECTS} (split the call)")

    def per_object(value: Any, name: str) -> list[Any]:
        if value is None:
            return [None] * n
        if not isinstance(value, (list, tuple)) or (name == "box" and _is_box(value)):
            raise InputError(f"with {n} objects, {name} must be a list of {n} {name}es (None where unused), "
                             f"got {type(value).__name__}")
        if len(value) != n:
            raise InputError(f"{len(value)} {name}(es) for {n} objects; give one per object")
        return list(value)

    return list(obj), per_object(box, "box"), per_object(mask, "mask")


MAX_OBJECTS = 64


@dataclass
class _Prepared:
    """One object's job with what paste-back needs afterwards."""

    rgb: np.ndarray
    region_box: geometry.Box
    region_mask: np.ndarray | None
    window: geometry.Window
    job: Job
    seconds: float


def _batch_job(raw: Any) -> dict[str, Any]:
    """A paste_batch job as a dict with object, background, box, mask, seed."""
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - {"object", "background", "box", "mask", "seed"})
        if unknown or "object" not in raw or "background" not in raw:
            raise InputError(f"a batch job needs keys 'object' and 'background' (and 'box' or 'mask', optionally "
                             f"'seed'); got keys {sorted(raw)}")
        item = dict(raw)
    elif isinstance(raw, tuple) and len(raw) in (3, 4):
        item = dict(zip(("object", "background", "box", "seed"), raw))
    else:
        raise InputError(f"a batch job must be a dict or a tuple (object, background, box[, seed]); got "
                         f"{type(raw).__name__}")
    if isinstance(item["object"], (list, tuple)):
        raise InputError("a batch job pastes one object; use paste() for several objects in one image")
    return item
