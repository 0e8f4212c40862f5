"""Imports point downward only (DESIGN.md, "Layout and layers").

Every module of the package is parsed (not imported) and each `import jaxdiff...` /
`from jaxdiff... import` in it, including imports inside functions, is checked against the
layer table below: a module may import its own package and any package of a lower layer; the
system layer's packages may also import each other; nothing below `cli` imports `cli`.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdiff")

# package -> (layer, may import other packages of the same layer)
LAYERS = {
    "jaxdiff.core": (0, False),  # the math: pure jax/numpy
    "jaxdiff.kernels": (0, False),  # Pallas kernels: nothing of jaxdiff
    "jaxdiff.samplers": (1, False),  # -> core, kernels
    "jaxdiff.models": (1, False),  # -> kernels (and core)
    "jaxdiff": (2, True),  # the facade: jaxdiff/__init__.py and sampling.py
    "jaxdiff.sampling": (2, True),
    "jaxdiff.accel": (3, False),  # methods: never each other
    "jaxdiff.distill": (3, False),
    "jaxdiff.inverse": (3, False),
    "jaxdiff.steer": (3, False),
    "jaxdiff.discrete": (3, False),
    "jaxdiff.train": (4, True),  # the system layer
    "jaxdiff.eval": (4, True),
    "jaxdiff.data": (4, True),
    "jaxdiff.interop": (4, True),
    "jaxdiff.pipelines": (4, True),
    "jaxdiff.cli": (5, False),  # entry points
}


def package_of(module):
    """The LAYERS entry a dotted module name belongs to (the longest matching prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    raise KeyError(f"{module} is in no layer: add its package to LAYERS")


def imported(source, module, is_package):
    """Dotted names of the jaxdiff modules `source` imports (absolute or relative)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "jaxdiff"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "jaxdiff":
                # `from jaxdiff import cli` imports the package jaxdiff.cli
                found += [f"{target}.{a.name}" if target == "jaxdiff" else target
                          for a in node.names]
    return found


def violations(module, source, is_package=False):
    """(module, imported, why) for each import that points up or sideways."""
    own = package_of(module)
    layer, siblings = LAYERS[own]
    out = []
    for target in imported(source, module, is_package):
        try:
            other = package_of(target)
        except KeyError:
            other = "jaxdiff"  # a name imported from the facade (e.g. `from jaxdiff import sample`)
        if other == own:
            continue
        their = LAYERS[other][0]
        if their > layer or (their == layer and not siblings):
            out.append((module, target, f"layer {layer} ({own}) imports layer {their} ({other})"))
    return out


def modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                is_package = rel.endswith(".__init__")
                yield rel.removesuffix(".__init__"), path, is_package


def test_every_module_imports_downward_only():
    bad = []
    for module, path, is_package in modules():
        with open(path) as f:
            bad += violations(module, f.read(), is_package)
    assert not bad, "\n".join(f"{m} imports {t}: {why}" for m, t, why in bad)


def test_every_package_has_a_layer():
    for module, _, _ in modules():
        package_of(module)  # raises for a package missing from LAYERS


@pytest.mark.parametrize("module,source", [
    ("jaxdiff.core.process", "from jaxdiff.samplers import base"),  # core -> samplers
    ("jaxdiff.core.schedules", "def f():\n    from jaxdiff.cli import build\n"),  # lazy
    ("jaxdiff.samplers.single", "import jaxdiff.models.unet"),  # samplers -> models
    ("jaxdiff.models.unet", "from jaxdiff.train import parallel"),  # models -> system
    ("jaxdiff.kernels.attention", "from jaxdiff.core import process"),  # kernels -> core
    ("jaxdiff.train.loop", "from jaxdiff.cli import commands"),  # system -> cli
    ("jaxdiff.eval.quality", "from ..cli import build"),  # relative
    ("jaxdiff.core.process", "from jaxdiff import sample"),  # core -> the facade
])
def test_a_wrong_import_is_caught(module, source):
    assert violations(module, source), f"{source!r} in {module} was not flagged"


@pytest.mark.parametrize("module,source", [
    ("jaxdiff.samplers.single", "from jaxdiff.core.denoiser import lift"),
    ("jaxdiff.samplers.multistep", "from jaxdiff.kernels.solver_step import solver_step"),
    ("jaxdiff.models.layers", "from jaxdiff.kernels.attention import flash_attention"),
    ("jaxdiff.eval.quality", "from jaxdiff.data import build"),  # system siblings
    ("jaxdiff.cli.commands", "from jaxdiff.train import loop"),
    ("jaxdiff.core.guidance", "from jaxdiff.core.denoiser import lift"),
])
def test_a_right_import_passes(module, source):
    assert not violations(module, source)
