"""The ComfyUI node pack, tested the way ComfyUI loads and calls it (ComfyUI itself is not installable here).

The shim is written into a custom_nodes folder and imported as a module; NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS are read; every INPUT_TYPES entry is checked against ComfyUI's documented
widget types; FUNCTION is called with IMAGE/MASK tensors; the output times 255 equals `paste` bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import gradient_background, noise_object

from composekit import Compositor, InputError

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}  # ComfyUI's widget types; a list of strings is a combo
DATA = {"IMAGE", "MASK", "COMPOSITOR"}  # connection types (COMPOSITOR is the pack's own)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from composekit.apps.comfyui import install

    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    shim = install(custom_nodes)
    spec = importlib.util.spec_from_file_location("custom_nodes.composekit", shim)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(arr: np.ndarray):
    """A ComfyUI IMAGE as LoadImage makes it: float32 B x H x W x 3 in 0..1."""
    return torch.from_numpy(arr[None, ..., :3].astype(np.float32) / 255.0)


def test_mappings_and_input_types_follow_comfyui(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS) == {"ComposekitLoadModel",
                                                                                   "ComposekitPaste"}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        for group in spec.values():
            for input_name, entry in group.items():
                kind, options = entry[0], entry[1] if len(entry) > 1 else {}
                if isinstance(kind, list):
                    assert kind and all(isinstance(c, str) for c in kind) and options.get("default", kind[0]) in kind
                elif kind in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], (name, input_name)
                    assert isinstance(options["default"], int if kind == "INT" else float), (name, input_name)
                else:
                    assert kind in WIDGETS | DATA, (name, input_name, kind)
    from composekit.core.options import PasteOptions

    paste_inputs = pack.NODE_CLASS_MAPPINGS["ComposekitPaste"].INPUT_TYPES()["required"]
    assert {n for n, s in PasteOptions.specs().items() if s.cli} <= set(paste_inputs)  # from the one schema


def test_the_example_workflow_loads_into_the_node_classes(pack):
    from composekit.apps.comfyui import example_workflow

    workflow = json.loads((ROOT / "docs" / "comfyui-workflow.json").read_text())
    assert workflow == json.loads(json.dumps(example_workflow()))  # the docs file is generated, and current
    ours = [node for node in workflow.values() if node["class_type"] in pack.NODE_CLASS_MAPPINGS]
    assert len(ours) == 2
    for node in ours:
        spec = pack.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        known = {**spec["required"], **spec.get("optional", {})}
        assert set(node["inputs"]) <= set(known), node["class_type"]
        assert set(spec["required"]) <= set(node["inputs"]), node["class_type"]
        for name, value in node["inputs"].items():
            kind = known[name][0]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                assert value[0] in workflow  # a link to another node's output
            elif isinstance(kind, list):
                assert value in kind
            elif kind == "INT":
                assert isinstance(value, int)


def test_classic_paste_node_equals_paste(pack):
    bg, obj = np.asarray(gradient_background(120, 90)), np.asarray(noise_object(40, 30, seed=3))
    (comp,) = pack.NODE_CLASS_MAPPINGS["ComposekitLoadModel"]().load("", "auto", "auto", "auto")
    node = pack.NODE_CLASS_MAPPINGS["ComposekitPaste"]()
    defaults = {n: e[1]["default"] for n, e in node.INPUT_TYPES()["required"].items() if len(e) > 1 and "default" in e[1]}
    image, edited = node.paste(comp, _image(obj), _image(bg), **{**defaults, "x0": 10, "y0": 20, "x1": 70, "y1": 80})
    expected = Compositor().paste(obj, bg, (10, 20, 70, 80))
    assert image.dtype == torch.float32 and image.shape == (1, 90, 120, 3) and edited.shape == (1, 90, 120)
    np.testing.assert_array_equal(np.rint(image[0].numpy() * 255).astype(np.uint8), np.asarray(expected.image))
    np.testing.assert_array_equal(edited[0].numpy() > 0.5, expected.mask)
    with pytest.raises(InputError, match="steps applies to the generative method only"):
        node.paste(comp, _image(obj), _image(bg), **{**defaults, "x0": 10, "y0": 20, "x1": 70, "y1": 80, "steps": 10})


def test_generative_node_with_masks_batches_progress_and_cancel(pack, tiny_model_dir, monkeypatch):
    bg, obj = np.asarray(gradient_background(100, 80)), np.asarray(noise_object(40, 30, seed=3))
    alpha = np.zeros((30, 40), np.uint8)
    alpha[5:25, 8:32] = 255
    comp = pack.NODE_CLASS_MAPPINGS["ComposekitLoadModel"]().load(str(tiny_model_dir), "torch", "cpu", "auto")[0]
    again = pack.NODE_CLASS_MAPPINGS["ComposekitLoadModel"]().load(str(tiny_model_dir), "torch", "cpu", "auto")[0]
    assert again is comp  # cached per process
    node = pack.NODE_CLASS_MAPPINGS["ComposekitPaste"]()
    defaults = {n: e[1]["default"] for n, e in node.INPUT_TYPES()["required"].items() if len(e) > 1 and "default" in e[1]}
    region = np.zeros((80, 100), np.float32)
    region[10:60, 20:70] = 1.0
    # ComfyUI's LoadImage gives MASK = 1 - alpha; the node turns it back into the object's alpha.
    object_mask = torch.from_numpy((1.0 - alpha / 255.0)[None].astype(np.float32))

    updates, checks = [], []
    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=lambda total: types.SimpleNamespace(
        update_absolute=lambda value, total_=None: updates.append((value, total))))
    comfy.model_management = types.SimpleNamespace(throw_exception_if_processing_interrupted=lambda: checks.append(1))
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)

    settings = {**defaults, "steps": 3, "seed": 5}
    image, edited = node.paste(comp, _image(obj), _image(bg), object_mask=object_mask,
                               region_mask=torch.from_numpy(region[None]), **settings)
    expected = comp.paste(np.dstack([obj, alpha]), bg, mask=region > 0.5, seed=5, steps=3, progress=False)
    np.testing.assert_array_equal(np.rint(image[0].numpy() * 255).astype(np.uint8), np.asarray(expected.image))
    np.testing.assert_array_equal(edited[0].numpy() > 0.5, expected.mask)
    assert updates == [(1, 3), (2, 3), (3, 3)] and len(checks) == 3

    # A batch of backgrounds: paste_batch, seeds seed + i, within its tolerance of one-by-one pastes.
    backgrounds = torch.cat([_image(bg), _image(bg[::-1].copy())])
    images, masks = node.paste(comp, _image(obj), backgrounds, **{**settings, "x0": 10, "y0": 10, "x1": 60, "y1": 60})
    assert images.shape == (2, 80, 100, 3) and masks.shape == (2, 80, 100)
    for i, background in enumerate((bg, bg[::-1].copy())):
        one = comp.paste(obj, background, (10, 10, 60, 60), seed=5 + i, steps=3, progress=False)
        diff = np.abs(np.rint(images[i].numpy() * 255).astype(int) - np.asarray(one.image).astype(int)).max()
        assert diff <= 1, (i, diff)

    class Interrupted(Exception):
        pass

    def cancel():
        raise Interrupted()

    comfy.model_management.throw_exception_if_processing_interrupted = cancel
    with pytest.raises(Interrupted):  # ComfyUI's cancel stops the sampler between steps
        node.paste(comp, _image(obj), _image(bg), **{**settings, "x0": 10, "y0": 10, "x1": 60, "y1": 60})
