"""The public entry point: [`Compositor`][composekit.Compositor] and its result, [`CompositeResult`][composekit.CompositeResult]."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from . import geometry
from .backends import Backend, choose_backend, open_backend
from .errors import ComposekitError, InputError
from .images import load_picture, to_caller_kind
from .loading import TINY_VAE_ALLOW_PATTERNS, resolve_source
from .options import MAX_FEATHER, ClassicOptions, GenerativeOptions, field_names
from .preprocess import ClipPreprocessor, flatten_cutout, require_visible
from .sampler import Job, SamplerOptions, check_latents, sample_batch
from .scheduler import DDIMScheduler

__all__ = ["Compositor", "CompositeResult"]

logger = logging.getLogger(__name__)
_CONTEXT_CACHE_SIZE = 8  # objects whose encoded context is kept between calls


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
        seed: the seed the noise was drawn from (drawn at random when the call gave none).
        steps, guidance: the sampler settings used (0 for the classic method).
        timings: seconds per stage (``encode_object``, ``encode_image``, ``denoise``, ``decode``,
            ``prepare``, ``paste``, ``total``; ``classic``, ``total`` for the classic method), summed
            over the objects.
        method: ``"generative"`` or ``"classic"``.
        seeds: each object's seed (the first is ``seed``).
        boxes: each object's region box.
    """

    image: Any
    mask: np.ndarray
    box: tuple[int, int, int, int]
    seed: int
    steps: int
    guidance: float
    timings: Mapping[str, float] = field(default_factory=dict)
    method: str = "generative"
    seeds: tuple[int, ...] = ()
    boxes: tuple[tuple[int, int, int, int], ...] = ()


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

    Build one with [`from_pretrained`][composekit.Compositor.from_pretrained] and call [`paste`][composekit.Compositor.paste]. A ``Compositor`` holds the loaded
    model and no per-call state, so one instance can serve several threads.
    """

    def __init__(self, backend: Backend | None = None, scheduler: DDIMScheduler | None = None,
                 preprocessor: ClipPreprocessor | None = None,
                 backdrop: tuple[int, int, int] = (255, 255, 255)) -> None:
        """``Compositor()`` with no model is the weights-free ``classic`` compositor; use
        [`from_pretrained`][composekit.Compositor.from_pretrained] for the generative one."""
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
                ``torch``: ``channels_last``, ``compile`` (see the backends page of the docs).
        """
        root = resolve_source(source, revision=revision, local_files_only=local_files_only)
        # The directory is read once (by its marker's reader) and opened by the chosen backend, which
        # returns itself with its card: model info, scheduler and feature-extractor configs, backdrop.
        name, content = choose_backend(backend, root, device)
        if vae is not None:
            if name == "torch":
                vae = resolve_source(vae, local_files_only=local_files_only, allow_patterns=TINY_VAE_ALLOW_PATTERNS)
            backend_options["vae"] = vae
        loaded = open_backend(name, content, device=device, dtype=dtype, **backend_options)
        card = loaded.card
        scheduler = DDIMScheduler.from_config(card.scheduler)
        preprocessor = ClipPreprocessor.from_config(card.feature_extractor)
        # cutout_backdrop was checked against its schema when the index or manifest was read (composekit.configs)
        logger.info("loaded %s with backend %s (%s)", root, name, loaded.describe())
        return cls(loaded, scheduler, preprocessor, card.backdrop)

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
        fidelity: float = 0.0,
        fidelity_factor: int | None = None,
        fidelity_steps: float | None = None,
        region: str = "box",
        margin: int | None = None,
        options: GenerativeOptions | ClassicOptions | None = None,
    ) -> CompositeResult:
        """Paste ``obj`` into ``background`` at ``box`` (or ``mask``) and let the model harmonise it.

        Args:
            obj: The object (PIL image, ``HxWx3``/``HxWx4`` array, path or bytes). An alpha channel
                marks a cut-out (see ``composekit.preprocess``). A list of objects pastes them one
                after another (then ``box``/``mask`` are lists of the same length): each sees the
                earlier ones in its context window, and later objects cover earlier ones where their
                regions overlap.
            background: The scene, any size, same kinds as ``obj``.
            box: ``(x0, y0, x1, y1)`` in background pixels, ``x1``/``y1`` exclusive.
            mask: Alternatively (or inside ``box``), an image or array the background's size whose
                white pixels (>= 128, or True for a bool array) are the editable region.
            steps: DDIM steps.
            guidance: Classifier-free guidance scale (<= 1 disables it).
            eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
            seed: Seed of all noise (drawn on the CPU); None draws one (reported in the result). With
                several objects, object ``i > 0`` uses a seed derived from it (``result.seeds``).
            latents: Initial noise ``(1, 4, M/8, M/8)`` to use instead of drawing it from ``seed``
                (one object only).
            context: Side of the square context window the model sees, in multiples of the box's
                longer side (1..64).
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
                margin (what is pasted back), which is cheaper when the region is small. Needs a
                backend whose decoder takes any size (``torch``).
            fidelity: 0..1, how much of the object's own appearance the region keeps (masked ILVR
                towards the naive paste; see the concepts page of the docs). 0 (default) = off, the
                plain sampler bit for bit; 1 = the naive paste itself.
            fidelity_factor: Expert override of the low-pass factor ``N`` (latent cells) that
                ``fidelity`` maps to.
            fidelity_steps: Expert override of the fraction of steps that ``fidelity`` maps to.
            region: ``"box"`` (default: the whole box, or the mask, is editable) or ``"silhouette"``:
                for a cut-out (RGBA) object, only its alpha placed in the box and grown by ``margin``
                pixels is editable, so less background is regenerated.
            margin: Silhouette growth in pixels; None = 1/8 of the box's shorter side (at least 2).
            harmonize: Classic method: colour-transfer strength, 0..1.
            shadow: Classic method: contact-shadow darkness, 0..1.
            options: A [`GenerativeOptions`][composekit.options.GenerativeOptions] or
                [`ClassicOptions`][composekit.options.ClassicOptions] instead of the keyword options above
                (not both).

        Returns:
            A `CompositeResult`; pixels outside ``result.mask`` equal the background's exactly.

        Raises:
            InputError: An argument is invalid (the message says what was expected).
            NumericalError: NaN or inf appeared while sampling or decoding.
        """
        start = time.perf_counter()
        given = {k: v for k, v in locals().items() if k in _OPTION_KEYWORDS}  # the option keywords, as passed
        method, opts = self._options(method, options, given)
        seed = _seed(seed)
        _check_region_options(region, margin)

        bg = load_picture(background, "background")
        objects, boxes, masks = _jobs(obj, box, mask)
        if latents is not None and len(objects) > 1:
            raise InputError("latents= sets one object's initial noise; with several objects pass seed= instead")
        pictures = []
        for i, item in enumerate(objects):
            ob = load_picture(item, "object" if len(objects) == 1 else f"object {i}")
            require_visible(ob.alpha)
            pictures.append(ob)
        seeds = [seed] + [_derived_seed(seed, i) for i in range(1, len(objects))]
        regions = [_object_region(ob, b, m, bg, region, margin) for ob, b, m in zip(pictures, boxes, masks)]

        rgb = bg.rgb
        changes = []
        timings: dict[str, float] = {}
        for ob, (region_box, region_mask), object_seed in zip(pictures, regions, seeds):
            if method == "classic":
                rgb, changed, stage = self._classic(rgb, ob, region_box, region_mask, opts)
            else:
                rgb, changed, stage = self._generate(rgb, ob, region_box, region_mask, object_seed, opts, latents,
                                                     callback)
            changes.append((region_box, changed))
            for key, value in stage.items():
                timings[key] = timings.get(key, 0.0) + value
        timings["total"] = time.perf_counter() - start
        return _composite_result(bg, rgb, changes, seeds, method, opts, timings)

    def _options(self, method: str | None, options: Any, given: dict[str, Any]) -> tuple[str, Any]:
        """The method and its validated options, from ``options=`` or from the keyword arguments."""
        if options is not None:
            if not isinstance(options, (GenerativeOptions, ClassicOptions)):
                raise InputError(f"options must be a GenerativeOptions or ClassicOptions, got {type(options).__name__}")
            changed = sorted(k for k, v in given.items() if v != _PASTE_DEFAULTS[k])
            if changed:
                raise InputError(f"pass either options= or keyword options, not both (got options= and {changed})")
            implied = "classic" if isinstance(options, ClassicOptions) else "generative"
            if method is not None and method != implied:
                raise InputError(f"method={method!r} does not match options of type {type(options).__name__}")
            method = implied
        method = method or ("generative" if self.backend is not None else "classic")
        _choice_check("method", method, ("generative", "classic"))
        if method == "generative" and self.backend is None:
            raise InputError(
                "this Compositor has no model, so only method='classic' is available; load one with "
                "Compositor.from_pretrained('Fantasy-Studio/Paint-by-Example') for generative compositing"
            )
        if options is None:
            cls = GenerativeOptions if method == "generative" else ClassicOptions
            # Every keyword is checked, also those the chosen method does not use (a typo is never silent).
            GenerativeOptions(**{k: v for k, v in given.items() if k in _GENERATIVE_FIELDS})
            ClassicOptions(**{k: v for k, v in given.items() if k in _CLASSIC_FIELDS})
            options = cls(**{k: v for k, v in given.items() if k in field_names(cls)})
        if method == "generative":
            if options.decode == "region" and not self.backend.info.any_size_decode:
                raise InputError(f"decode='region' needs a decoder that takes any latent size; the "
                                 f"{self.backend.name} backend's exported decoder has a fixed size. Use "
                                 "decode='window' or backend='torch'")
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
            from .classic import classic_composite

            naive, _ = classic_composite(rgb, ob.rgb, ob.alpha, region_box, region_mask, harmonize=0.0, shadow=0.0,
                                         feather=0)
            guide = geometry.crop_window(naive, window)
        f = info.vae_scale_factor
        shape = (1, info.latent_channels, info.model_size // f, info.model_size // f)
        job = Job(window_pixels, hole, object_pixels, seed, guide,
                  None if latents is None else check_latents(latents, shape))
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

    def _sampler_options(self, opts: GenerativeOptions, seed: int = 0, callback: Any = None) -> SamplerOptions:
        return SamplerOptions(steps=opts.steps, guidance=opts.guidance, eta=opts.eta, seed=seed,
                              guidance_end=opts.guidance_end, decode=opts.decode, progress=opts.progress,
                              callback=callback, ilvr=opts.ilvr)

    def _generate(self, rgb: np.ndarray, ob: Any, region_box: geometry.Box, region_mask: np.ndarray | None,
                  seed: int, opts: GenerativeOptions, latents: Any, callback: Any
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """One object, generated: (new background pixels, changed pixels of the box, stage timings)."""
        prep = self._prepare(rgb, ob, region_box, region_mask, seed, opts, latents)
        out = sample_batch(self.backend, self.scheduler, [prep.job], self._sampler_options(opts, seed, callback),
                           encode_objects=self._object_contexts)[0]
        if isinstance(out, ComposekitError):
            raise out
        return self._finish(prep, out, opts)

    # -- many composites ----------------------------------------------------------------------------

    def paste_batch(self, jobs: Iterable[Any], *, batch_size: int = 4, **options: Any) -> list[Any]:
        """Many independent composites, sampled together; returns one entry per job, in order.

        Each job is a mapping with keys ``object``, ``background`` and ``box`` and/or ``mask``, and
        optionally ``seed`` (drawn when absent), or a tuple ``(object, background, box)`` /
        ``(object, background, box, seed)``. ``options`` are [`paste`][composekit.Compositor.paste]'s keyword options (``steps``,
        ``guidance``, ``fidelity``, ``region``, ..., or ``options=``), shared by every job; ``progress``
        defaults to False here, and ``callback(step, timestep, latents)`` sees each batch's latents
        ``(B, 4, h, w)`` (the jobs that reached the sampler, in order).

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
        return list(self.paste_stream(jobs, batch_size=batch_size, **options))

    def paste_stream(self, jobs: Iterable[Any], *, batch_size: int = 4, **options: Any) -> Iterator[Any]:
        """[`paste_batch`][composekit.Compositor.paste_batch] as an iterator: jobs are read lazily and results come out as each batch
        finishes, so memory is bounded by ``batch_size`` whatever the number of jobs."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= 256:
            raise InputError(f"batch_size must be an integer in 1..256, got {batch_size!r}")
        unknown = sorted(set(options) - _BATCH_OPTIONS)
        if unknown:
            raise InputError(f"paste_batch takes no option(s) {unknown}; per-job values (object, background, box, "
                             f"mask, seed) go in the jobs, shared ones are {sorted(_BATCH_OPTIONS)}")
        if options.get("options") is None:
            options.setdefault("progress", False)
        method = options.get("method")
        given = {k: options.get(k, _PASTE_DEFAULTS[k]) for k in _OPTION_KEYWORDS}
        method, opts = self._options(method, options.get("options"), given)
        limit = self.backend.info.max_batch if self.backend is not None else None
        if method == "generative" and limit is not None and batch_size > limit:
            raise InputError(f"batch_size={batch_size}, but this {self.backend.name} model takes at most {limit} "
                             f"composites per batch; pass batch_size<={limit} or re-export with --max-batch {batch_size}")
        shared = {k: options[k] for k in ("region", "margin", "callback") if k in options}
        _check_region_options(shared.get("region", "box"), shared.get("margin"))
        iterator = iter(jobs)
        while True:
            chunk = list(itertools.islice(iterator, int(batch_size)))
            if not chunk:
                return
            yield from self._run_batch(chunk, method, opts, shared)

    def _run_batch(self, chunk: list[Any], method: str, opts: Any, shared: dict[str, Any]) -> list[Any]:
        """One batch: prepare each job (failures are kept in place), sample the good ones together, finish."""
        results: list[Any] = [None] * len(chunk)
        prepared: dict[int, tuple[Any, _Prepared, int]] = {}
        for i, raw in enumerate(chunk):
            try:
                item = _batch_job(raw)
                if method == "classic":
                    results[i] = self.paste(item["object"], item["background"], item.get("box"), mask=item.get("mask"),
                                            seed=item.get("seed"), options=opts, region=shared.get("region", "box"),
                                            margin=shared.get("margin"))
                    continue
                seed = _seed(item.get("seed"))
                bg = load_picture(item["background"], "background")
                ob = load_picture(item["object"], "object")
                require_visible(ob.alpha)
                region_box, region_mask = _object_region(ob, item.get("box"), item.get("mask"), bg,
                                                         shared.get("region", "box"), shared.get("margin"))
                prepared[i] = (bg, self._prepare(bg.rgb, ob, region_box, region_mask, seed, opts), seed)
            except ComposekitError as exc:
                results[i] = exc
        if prepared:
            rows = sorted(prepared)
            outs = sample_batch(self.backend, self.scheduler, [prepared[i][1].job for i in rows],
                                self._sampler_options(opts, callback=shared.get("callback")),
                                encode_objects=self._object_contexts)
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

    def _object_contexts(self, pixels: list[np.ndarray]) -> tuple[Any, Any]:
        """The objects' (cond, uncond) contexts, one row each: cached objects from the cache, the others
        encoded together in one call (an object repeated in the batch is encoded once).

        Only single-object encodes are cached, so a cached context is bit for bit what encoding that
        object alone gives, whatever batches ran before. Entries are read-only backend arrays; the lock
        only guards the cache's bookkeeping, so concurrent calls still encode in parallel.
        """
        keys = [hashlib.sha256(p.tobytes()).digest() for p in pixels]
        rows: dict[bytes, tuple[Any, Any]] = {}
        with self._cache_lock:
            for key in keys:
                hit = self._context_cache.get(key)
                if hit is not None:
                    self._context_cache.move_to_end(key)
                    rows[key] = hit
        missing = list(dict.fromkeys(k for k in keys if k not in rows))
        if missing:
            by_key = dict(zip(keys, pixels))  # equal keys, equal pixels
            cond, uncond = self.backend.encode_object(np.concatenate([by_key[k] for k in missing]))
            fresh = {k: (cond, uncond) if len(missing) == 1 else (cond[j:j + 1], uncond[j:j + 1])
                     for j, k in enumerate(missing)}
            rows.update(fresh)
            if len(missing) == 1:
                with self._cache_lock:
                    self._context_cache.update(fresh)
                    while len(self._context_cache) > _CONTEXT_CACHE_SIZE:
                        self._context_cache.popitem(last=False)
        if len(keys) == 1:
            return rows[keys[0]]
        return (self.backend.cat([rows[k][0] for k in keys], 0), self.backend.cat([rows[k][1] for k in keys], 0))

    def _classic(self, rgb: np.ndarray, ob: Any, region_box: geometry.Box, region_mask: np.ndarray | None,
                 opts: ClassicOptions) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """One object, the weights-free way: (new background pixels, changed pixels of the box, timings)."""
        from .classic import classic_composite

        start = time.perf_counter()
        radius = 2 if opts.feather is None else opts.feather
        composite, changed = classic_composite(rgb, ob.rgb, ob.alpha, region_box, region_mask,
                                               harmonize=opts.harmonize, shadow=opts.shadow, feather=radius)
        return composite, changed, {"classic": time.perf_counter() - start}


def _check_region_options(region: Any, margin: Any) -> None:
    _choice_check("region", region, ("box", "silhouette"))
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, np.integer))
                               or not 0 <= margin <= MAX_FEATHER):
        raise InputError(f"margin must be an integer in 0..{MAX_FEATHER} (pixels) or None, got {margin!r}")


def _object_region(ob: Any, box: Any, mask: Any, bg: Any, region: str, margin: int | None
                   ) -> tuple[geometry.Box, np.ndarray | None]:
    """One object's editable region: its box (or mask), or with ``region="silhouette"`` its grown alpha."""
    region_box, region_mask = _region(mask, box, bg.width, bg.height)
    if region == "silhouette":
        if mask is not None:
            raise InputError("region='silhouette' makes the region from the object's alpha; drop mask= "
                             "(or use region='box' with your mask)")
        grow = geometry.default_margin(region_box) if margin is None else int(margin)
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
    return CompositeResult(image=to_caller_kind(rgb, bg), mask=mask, box=union, seed=seeds[0],
                           steps=opts.steps if generative else 0, guidance=opts.guidance if generative else 0.0,
                           timings=MappingProxyType(timings), method=method, seeds=tuple(seeds), boxes=boxes)


def _choice_check(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _derived_seed(seed: int, index: int) -> int:
    """The seed of object ``index`` (> 0) of a several-object call: a 63-bit hash of (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


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
_PASTE_DEFAULTS = {name: p.default for name, p in inspect.signature(Compositor.paste).parameters.items()}
_GENERATIVE_FIELDS, _CLASSIC_FIELDS = field_names(GenerativeOptions), field_names(ClassicOptions)
_OPTION_KEYWORDS = tuple(sorted(_GENERATIVE_FIELDS | _CLASSIC_FIELDS))  # paste's keywords that are options
_BATCH_OPTIONS = set(_OPTION_KEYWORDS) | {"method", "options", "region", "margin", "callback"}
