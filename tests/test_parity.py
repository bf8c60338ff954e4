"""composekit against diffusers' PaintByExamplePipeline on the same weights (the reference).

Setup: a tiny random Paint-by-Example model; background at the model's size (no crop, no resize);
the same initial latents, steps, guidance and DDIM scheduler (``clip_sample=False``: the model's
PNDM config has no such key, and composekit does not clip latents). Tolerance: 2/255 per pixel inside
the box, with composekit's soft edge off (``feather=0``).

Two documented differences are outside the comparison: composekit encodes the masked background
with the VAE posterior's mean while diffusers samples it (the builder gives the random VAE a
trained-like, very narrow posterior), and diffusers also rewrites pixels outside the mask, which
composekit never does (checked below too).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from PIL import Image

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    try:  # newer diffusers moved it under pipelines/deprecated
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExamplePipeline
    except ImportError:
        from diffusers.pipelines.paint_by_example import PaintByExamplePipeline
    from transformers import CLIPImageProcessor

    from composekit.backends.torch_backend import image_encoder_class

    d = tiny_model_dir
    pipe = PaintByExamplePipeline(
        vae=AutoencoderKL.from_pretrained(d / "vae"),
        image_encoder=image_encoder_class().from_pretrained(d / "image_encoder"),
        unet=UNet2DConditionModel.from_pretrained(d / "unet"),
        scheduler=DDIMScheduler.from_pretrained(d / "scheduler", clip_sample=False),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(d / "feature_extractor"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps,guidance", [(10, 5.0), (4, 1.0), (6, 2.5)])
def test_generated_region_matches_diffusers(compositor, reference, steps, guidance):
    torch = pytest.importorskip("torch")
    size = compositor.backend.info.model_size
    bg, obj = gradient_background(size, size), noise_object()
    box = (16, 8, 48, 40)
    latents = np.random.default_rng(steps).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)

    ours = compositor.paste(obj, bg, box, steps=steps, guidance=guidance, latents=latents, feather=0,
                            progress=False, seed=0)
    mask = np.zeros((size, size), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    ref = reference(example_image=obj, image=bg, mask_image=Image.fromarray(mask), num_inference_steps=steps,
                    guidance_scale=guidance, latents=torch.from_numpy(latents)).images[0]

    a, b = np.asarray(ours.image, np.int16), np.asarray(ref, np.int16)
    inside = mask > 0
    assert np.abs(a - b)[inside].max() <= 2
    # The comparison is not vacuous: the generated region is far from the background...
    assert np.abs(b - np.asarray(bg, np.int16))[inside].mean() > 10
    # ...and diffusers changes pixels outside the mask, which composekit leaves exact.
    np.testing.assert_array_equal(a[~inside], np.asarray(bg)[~inside])


def test_object_pixels_match_the_models_feature_extractor(compositor, reference):
    for w, h in [(70, 90), (300, 120), (224, 224), (17, 500)]:
        obj = noise_object(w, h, seed=w)
        ours = compositor.preprocessor(np.asarray(obj))
        theirs = reference.feature_extractor(images=obj, return_tensors="np").pixel_values
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("interval", [3, 2])
def test_feature_caching_matches_deepcache(compositor, reference, interval):
    """``cache_interval=N`` against the DeepCache authors' helper on diffusers' pipeline (branch 0, the
    shallowest; uniform schedule), same weights, latents and steps. Same tolerance as above."""
    torch = pytest.importorskip("torch")
    deepcache = pytest.importorskip("DeepCache", reason="the DeepCache package is the reference")
    size = compositor.backend.info.model_size
    bg, obj = gradient_background(size, size), noise_object()
    box = (16, 8, 48, 40)
    steps = 10
    latents = np.random.default_rng(interval).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    mask = np.zeros((size, size), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    inside = mask > 0

    def run_reference():
        return reference(example_image=obj, image=bg, mask_image=Image.fromarray(mask), num_inference_steps=steps,
                         guidance_scale=5.0, latents=torch.from_numpy(latents)).images[0]

    helper = deepcache.DeepCacheSDHelper(pipe=reference)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        ref = run_reference()
    finally:
        helper.disable()
    plain = run_reference()
    cached = compositor.paste(obj, bg, box, steps=steps, guidance=5.0, latents=latents, feather=0, progress=False,
                              seed=0, cache_interval=interval)
    a, b, p = (np.asarray(x, np.int16) for x in (cached.image, ref, plain))
    assert np.abs(a - b)[inside].max() <= 2
    # Not vacuous: caching changed the reference's own result, by more than the tolerance.
    assert np.abs(b - p)[inside].max() > 2
    np.testing.assert_array_equal(a[~inside], np.asarray(bg)[~inside])
