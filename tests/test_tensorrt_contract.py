"""Every TensorRT name the backend, the engine builder and the stand-in use exists in TensorRT 11's real
Python bindings, so the stand-in (tests/fake_tensorrt.py) cannot drift from the API it imitates.

The bindings wheel (``tensorrt-cu13-bindings``, about 1 MB, on PyPI) cannot be imported without
TensorRT's libraries, which are not on the package index; its names are read from the files instead:
the pybind11 extension module's string table (method, property, class and enum-member names are
stored there as NUL-terminated strings; the linker may merge a short name into the tail of a longer
one, so a name is looked for as a string *ending* in it) and the package's ``__init__.py`` (``nptype``).
The wheel is downloaded once per machine into ``~/.cache/composekit-tests`` (or
``$COMPOSEKIT_TRT_BINDINGS_WHEEL`` names one).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "tensorrt-cu13-bindings==11.4.0.106"  # TensorRT 11.4, what PyPI's tensorrt-cu13 pulls today
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "composekit-tests"

# Local names that hold TensorRT objects in each file (what their attributes are looked up on).
TRT_ROOTS = {
    ROOT / "composekit/backends/tensorrt_backend.py": {"trt", "runtime", "engine", "context", "self.trt",
                                                       "self.engines"},
    ROOT / "export/tensorrt_build.py": {"trt", "builder", "network", "parser", "config", "profile", "cache", "log"},
}
# The stand-in's own helpers, which TensorRT does not have (its classes stand for ICudaEngine and
# IExecutionContext, whose Python names differ; their members are checked).
FAKE_ONLY = {"Engine", "Context", "FAKE_GPU", "build_fake_engines", "annotations"}


@pytest.fixture(scope="module")
def bindings() -> tuple[bytes, set[str]]:
    """(the extension module's bytes, the names the package's __init__.py defines)."""
    given = os.environ.get("COMPOSEKIT_TRT_BINDINGS_WHEEL")
    wheels = [Path(given)] if given else sorted(CACHE.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(CACHE),
                               WHEEL], capture_output=True, text=True, timeout=300)
        wheels = sorted(CACHE.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl"))
        if not wheels:
            pytest.skip(f"could not download {WHEEL} from the package index: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        blob = z.read("tensorrt_bindings/tensorrt.so")
        init = ast.parse(z.read("tensorrt_bindings/__init__.py").decode())
    defined = {n.name for n in ast.walk(init) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return blob, defined


def _in_bindings(name: str, bindings: tuple[bytes, set[str]]) -> bool:
    blob, defined = bindings
    return name in defined or name == "__version__" or (name.encode() + b"\x00") in blob


def _root(node: ast.AST) -> str:
    """The variable an attribute chain starts from: 'trt', 'engine', 'self.engines', ..."""
    while True:
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return f"self.{node.attr}"
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Name):
            return node.id
        else:
            return ""


def used_names(path: Path, roots: set[str]) -> set[str]:
    """Attribute names looked up on TensorRT objects in ``path`` (and getattr(trt_obj, "NAME") strings)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and _root(node.value) in roots:
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and _root(node.args[0]) in roots):
            names.add(node.args[1].value)
    return names


def fake_names() -> set[str]:
    """The stand-in's TensorRT-facing names: module-level functions and classes, and class members."""
    tree = ast.parse((ROOT / "tests/fake_tensorrt.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    names.add(item.name)
                if isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return names - FAKE_ONLY


def test_the_scan_finds_what_the_code_calls():
    # A guard against a scan that silently finds nothing: these calls are known to be in the files.
    backend = used_names(ROOT / "composekit/backends/tensorrt_backend.py",
                         TRT_ROOTS[ROOT / "composekit/backends/tensorrt_backend.py"])
    assert {"deserialize_cuda_engine", "execute_async_v3", "set_tensor_address", "nptype", "INPUT"} <= backend
    builder = used_names(ROOT / "export/tensorrt_build.py", TRT_ROOTS[ROOT / "export/tensorrt_build.py"])
    assert {"build_serialized_network", "STRONGLY_TYPED", "OnnxParser", "set_shape"} <= builder
    assert {"get_tensor_shape", "create_execution_context", "OUTPUT", "WARNING"} <= fake_names()


@pytest.mark.parametrize("source", ["backend", "builder", "stand-in"])
def test_every_tensorrt_name_exists_in_the_real_bindings(bindings, source):
    if source == "stand-in":
        names = fake_names()
    else:
        path = ROOT / ("composekit/backends/tensorrt_backend.py" if source == "backend" else "export/tensorrt_build.py")
        names = used_names(path, TRT_ROOTS[path])
    missing = sorted(n for n in names if not _in_bindings(n, bindings))
    assert not missing, f"{source} uses names TensorRT 11.4's bindings do not have: {missing}"


def test_a_name_tensorrt_lacks_is_caught(bindings):
    # The check can fail: names of TensorRT 8's binding-index API (gone since TensorRT 10) and a made-up one.
    for name in ("execute_async_v2", "set_binding_shape", "get_binding_index", "definitely_not_tensorrt"):
        assert not _in_bindings(name, bindings), name
