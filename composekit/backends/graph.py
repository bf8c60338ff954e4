"""What every runtime of exported graphs shares: the four component calls, the array plumbing, and the
load-time checks of an export's graphs (external data inside the directory, inputs and outputs as the
spec says).

A graph runtime (ONNX Runtime, OpenVINO, TensorRT) subclasses :class:`GraphBackend` and implements one
method, ``_run(component, inputs) -> outputs`` (float32 arrays of :attr:`arrays`' device, in the
spec's output order). No torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from composekit.backends.arrays import ArrayModule
from composekit.backends.base import ModelCard, ModelInfo, model_call
from composekit.errors import BackendUnavailableError, ComposekitError, InputError, ModelError, install_hint
from composekit.formats.export_manifest import load_order
from composekit.formats.safe_json import inside

__all__ = ["GraphBackend", "check_external_data", "check_graph_io", "check_export_dtype", "graph_components"]


def graph_components(manifest: Any, vae: Any) -> tuple[str, ...]:
    """The components to load from an export: the four (with the tiny decoder for ``vae="tiny"``) and the
    shallow U-Net of feature caching when the export has it. The decoder comes last; with ``vae=None`` an
    export's tiny decoder comes just before it (``speed="fast"`` decodes with it)."""
    if vae is None:
        tiny = ("tiny_vae_decoder",) if manifest.has("tiny_vae_decoder") else ()
        return load_order(manifest, (*tiny, "vae_decoder"))
    if vae != "tiny":
        raise InputError(f"vae={vae!r}: an export decodes with the decoders it was exported with; pass vae='tiny' "
                         "for the tiny decoder exported beside the VAE (composekit-export onnx --tiny-vae DIR), "
                         "or vae=None")
    if not manifest.has("tiny_vae_decoder"):
        raise InputError(f"vae='tiny': the export {manifest.root} has no tiny decoder; re-export it with "
                         "`composekit-export onnx MODEL OUT --tiny-vae TAESD_DIR`, or pass vae=None")
    return load_order(manifest, ("tiny_vae_decoder",))


def check_export_dtype(manifest: Any, dtype: Any, fix: str) -> None:
    """``dtype`` must be None or the export's precision, which was fixed when it was exported."""
    if dtype is not None and str(dtype).replace("float", "fp").replace("torch.", "") != manifest.precision:
        raise InputError(f"dtype {dtype!r} does not match the export's precision {manifest.precision!r}; {fix}")


class GraphBackend:
    """The :class:`~composekit.backends.base.Backend` interface over an abstract ``_run``."""

    name: str
    info: ModelInfo
    arrays: ArrayModule
    decoder: str = "vae_decoder"  # or "tiny_vae_decoder"
    fast_decoder: str = "vae_decoder"  # what decode(tiny=True) runs: the tiny decoder when it is loaded

    def _run(self, component: str, inputs: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def _open_export(self, manifest: Any, components: tuple[str, ...], read: Callable[[str, Path], Any],
                     io: Callable[[Any], tuple[list, list]], runtime: str,
                     path_of: Callable[[str], Path] | None = None, source: Path | None = None) -> dict[str, Any]:
        """Set what the export's manifest says (specs, precision, card) and read each component's graph with
        ``read(component, path)``, after its external data is checked and before its inputs and outputs are
        checked (``io``: the graph's (inputs, outputs) as :func:`check_graph_io` takes them). Returns the graphs
        by name.

        ``path_of(component)`` is where a component's file is (default: the export's ONNX graph; TensorRT
        passes its engines', checked against their sidecars first); ``source`` the directory loaded."""
        self.manifest, self.specs = manifest, manifest.specs()
        self.float = np.float16 if manifest.precision == "fp16" else np.float32
        self.card = ModelCard.from_manifest(manifest, str(source or manifest.root))
        self.info = self.card.info
        self.decoder = components[-1]
        self.fast_decoder = "tiny_vae_decoder" if "tiny_vae_decoder" in components else self.decoder
        graphs = {}
        for name in components:
            path = (path_of or manifest.path)(name)
            if path.suffix == ".onnx":
                check_external_data(path, manifest.root)
            try:
                graphs[name] = read(name, path)
            except ComposekitError:
                raise
            except Exception as exc:  # each runtime raises its own exception types
                raise ModelError(f"{runtime} could not load {path}: {exc}") from exc
            check_graph_io(*io(graphs[name]), self.specs[name], manifest.precision, path)
        return graphs

    def _export_notes(self, int8_form: str = "") -> str:
        """What the export changed in the model, for ``describe``: ``", int8 U-Net"`` (``--int8``), ``", token
        downsampling 2x"`` (``--token-downsampling 2``); empty for a plain export. ``int8_form`` follows the
        int8 note (which graphs of the export run it)."""
        notes = [f", int8 U-Net{int8_form}"] if self.manifest.int8 else []
        factor = self.manifest.token_downsampling
        return "".join(notes + ([f", token downsampling {factor}x"] if factor > 1 else []))

    # -- plumbing ---------------------------------------------------------------------------------

    def asarray(self, x: np.ndarray) -> Any:
        return self.arrays.from_host(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.arrays.to_host(x)

    def cat(self, xs: list[Any], axis: int) -> Any:
        return self.arrays.concatenate(xs, axis)

    def synchronize(self) -> None:
        self.arrays.synchronize()

    # -- the four components ----------------------------------------------------------------------

    @model_call("image encoder")
    def encode_object(self, pixels: np.ndarray) -> tuple[Any, Any]:
        context, uncond = self._run("object_encoder", {"pixel_values": self.asarray(pixels)})
        return context, uncond

    @model_call("VAE encoder")
    def encode_image(self, image: Any) -> Any:
        return self._run("vae_encoder", {"image": image})[0]

    def _unet_inputs(self, sample: Any, timestep: int, context: Any) -> dict[str, Any]:
        """The U-Net graphs' common inputs (the timestep repeated over the batch, on the backend's device)."""
        t = self.arrays.from_host(np.full((sample.shape[0],), int(timestep), np.int64), np.int64)
        return {"sample": sample, "timestep": t, "encoder_hidden_states": context}

    @model_call("U-Net")
    def unet(self, sample: Any, timestep: int, context: Any) -> Any:
        return self._run("unet", self._unet_inputs(sample, timestep, context))[0]

    @model_call("U-Net")
    def unet_with_features(self, sample: Any, timestep: int, context: Any) -> tuple[Any, Any]:
        eps, features = self._run("unet", self._unet_inputs(sample, timestep, context))
        return eps, features

    @model_call("U-Net (shallow pass)")
    def unet_shallow(self, sample: Any, timestep: int, context: Any, features: Any) -> Any:
        return self._run("unet_shallow", {**self._unet_inputs(sample, timestep, context), "features": features})[0]

    @model_call("VAE decoder")
    def decode(self, latents: Any, tiny: bool = False) -> Any:
        return self._run(self.fast_decoder if tiny else self.decoder, {"latent": latents})[0]


# -- load-time checks of an export's graphs ------------------------------------------------------------


def _tensors_with_data(model: Any) -> Any:
    """Every tensor of a graph that may carry external data: initializers, attribute tensors and the
    values and indices of sparse initializers, in the main graph and every subgraph."""
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def check_external_data(path: Path, root: Path) -> None:
    """Refuse a graph whose external-data references leave ``root`` (absolute, ``..``, symlinks out).

    Reads only the graph's protobuf (``load_external_data=False``), never the referenced files.
    Sparse initializers are checked too (ONNX Runtime releases before late 2025 do not check them).
    """
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError as exc:
        raise BackendUnavailableError(
            f"checking an exported graph's external data needs the onnx package; {install_hint('onnx')}"
        ) from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX graph ({type(exc).__name__}: {exc}); re-export the model") \
            from None
    for tensor in _tensors_with_data(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            target = inside(root, location, "external data", "export directory")
            if target.is_symlink():
                raise ModelError(f"{target} is a symlink")
        except ModelError as exc:
            raise ModelError(
                f"{path}: tensor {tensor.name!r} points its external data at {location!r}, outside the export "
                f"directory {root}; refusing to load it (re-export the model). ({exc})"
            ) from None


_FLOATS = {"fp32": "float32", "fp16": "float16"}


def check_graph_io(inputs: Iterable[tuple[str, str, list]], outputs: Iterable[tuple[str, str, list]], spec: Any,
                   precision: str, path: Path) -> None:
    """The graph's inputs and outputs are the spec's: names, ranks, fixed sizes and the manifest's precision.

    ``inputs``/``outputs``: (name, numpy dtype name, shape with ints for fixed sizes) as the runtime
    reports them. Catches a graph swapped for another (with its sha256 updated) and a manifest whose
    precision or dimensions contradict the graphs, at load time instead of inside the first run.
    """
    got_in, got_out = list(inputs), list(outputs)
    names_in, names_out = sorted(n for n, _, _ in got_in), sorted(n for n, _, _ in got_out)
    if names_in != sorted(spec.input_names) or names_out != sorted(spec.output_names):
        raise ModelError(f"{path}: graph inputs {names_in} and outputs {names_out} are not the {spec.name} spec's "
                         f"{spec.input_names} / {spec.output_names}; the file is not this export's graph. Re-export")
    got = {name: (dtype, shape) for name, dtype, shape in (*got_in, *got_out)}
    for tensor in (*spec.inputs, *spec.outputs):
        dtype, shape = got[tensor.name]
        want = "int64" if tensor.dtype == "int64" else _FLOATS[precision]
        if dtype != want:
            raise ModelError(f"{path}: {tensor.name} is {dtype}, but the manifest's precision {precision!r} needs "
                             f"{want}; the manifest and the graphs disagree. Re-export")
        if len(shape) != len(tensor.shape) or any(isinstance(w, int) and isinstance(g, int) and w != g
                                                  for w, g in zip(tensor.shape, shape)):
            raise ModelError(f"{path}: {tensor.name} has shape {list(shape)}; the manifest's dimensions give "
                             f"{list(tensor.shape)}. The manifest and the graphs disagree. Re-export")
