"""Model sources: where a recipe's base model comes from (step 00)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.hashing import write_joined

from pipeline.core.blocks import name_all_nodes
from pipeline.core.modelset import GraphFile, ModelSet, graph_sha256
from pipeline.core.onnx_io import external_files, is_light, load_onnx
from pipeline.core.recipe import ModelSource, Recipe, package_file

def resolve_model_path(source: ModelSource, recipe: Recipe | None = None) -> Path:
    if source.package:
        return package_file(source.package, source.file)
    if source.parts:
        return joined_parts(source.parts, source.file, source.sha256)
    return recipe.resolve_path(source.path) if recipe else Path(source.path)


_JOINED: dict[tuple[str, ...], Path] = {}  # (parts..., sha256) -> the joined file, for the life of this process


def joined_parts(parts: list[str], name: str, sha256: str) -> Path:
    """The file `parts` make joined in order (each "package:path" inside an installed package), checked against
    `sha256`. It is written to a temporary folder of this process, removed when the process ends: step 00 copies
    it into the run folder, as it copies any model file, and the user's installed packages are only read."""
    key = (*parts, sha256)
    if key in _JOINED and _JOINED[key].is_file():
        return _JOINED[key]
    folder = Path(tempfile.mkdtemp(prefix="pipeline-parts-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / name
    digest = write_joined([package_file(*part.split(":")) for part in parts], path)
    if digest != sha256:
        raise PipelineError(f"model.parts: the joined file's sha256 is {digest}, not the recipe's "
                            f"{sha256}: a part is missing, out of order, or another version")
    _JOINED[key] = path
    return path


def materialize_base(model_path: Path, dest: Path, family) -> ModelSet:
    """Copy an existing ONNX (and the sidecar files its family's runtime reads) into `dest` as a one-graph
    ModelSet of that family.

    The copy is what later steps read; the user's file is only ever read.
    """
    model = load_onnx(model_path)  # every bad-model error surfaces here, before any work
    dest.mkdir(parents=True, exist_ok=True)
    ms = ModelSet(dest, [GraphFile("model", model_path.name)])
    if name_all_nodes(model):  # (a large model's weights are copied from the user's files, only read)
        ms.save_graph("model", model, weights_dir=model_path.parent if is_light(model) else None)
    else:
        for f in [model_path, *external_files(model_path)]:  # its external-data files too
            shutil.copyfile(f, dest / f.name)
        ms.graphs[0].sha256 = graph_sha256(dest / model_path.name)
    ms.meta["family"] = family.name
    for sidecar in family.sidecars(model_path):
        shutil.copyfile(sidecar, dest / sidecar.name)
        ms.sidecars[sidecar.name] = "model"
    ms.write_manifest()
    return ms
