"""Recipes a search derives from the user's, and the resolved recipe it writes.

Fallback rounds and tune candidates run recipes made from the user's recipe
with some sections replaced (steps, model, check, targets). `derive` makes
them, with every relative path made absolute, so a derived recipe names the
same files wherever it is written or run, and a round carries the same recipe
hash as the resolved recipe that reproduces it. `write_resolved` writes the
last one as `resolved_recipe.yaml`: every per-block choice explicit, runnable
without the search.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.core.recipe import Recipe
from pipeline.engine.runfolder import RESOLVED_RECIPE
from pipeline.families import path_fields


def derive(recipe: Recipe, **sections: Any) -> Recipe:
    """`recipe` with the named top-level sections replaced (a model, a list of steps, None to drop one)."""
    data = recipe.model_dump(mode="python", by_alias=True, exclude={"source_path"})
    for key, value in sections.items():
        data[key] = _plain(value)
    absolute_paths(data, recipe)
    out = Recipe.model_validate(data)
    out.source_path = recipe.source_path
    return out


def _plain(value: Any) -> Any:
    """Pydantic models (a Step, a check section) as the dicts a recipe file holds."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python", by_alias=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def absolute_paths(data: dict[str, Any], original: Recipe) -> None:
    """Relative paths were relative to the original recipe's folder; a derived recipe lives elsewhere.

    The model's `path`, and the params each calibration source marks as paths (`path_fields`)."""
    if data["model"].get("path"):
        data["model"]["path"] = str(original.resolve_path(data["model"]["path"]))
    for section in (data.get("calibration"), (data.get("check") or {}).get("source")):
        if not section:
            continue
        params = section.get("params") or {}
        if params.get("package"):  # its paths lie inside an installed package, not beside the recipe
            continue
        for key in path_fields(section.get("source", "")):
            if params.get(key):
                section["params"][key] = str(original.resolve_path(section["params"][key]))


def write_resolved(resolved: Recipe, out_dir: Path, made_by: str) -> Path:
    """`resolved_recipe.yaml` in `out_dir`, headed by what resolved it (`made_by`, one line)."""
    data = resolved.model_dump(mode="json", by_alias=True, exclude={"source_path"}, exclude_none=True)
    data.pop("tune", None)
    if not data.get("targets"):
        data.pop("targets", None)
    path = out_dir / RESOLVED_RECIPE
    path.write_text(f"# Resolved by {made_by}: every per-block precision choice is explicit;\n"
                    f"# running this recipe rebuilds the same model, byte for byte, without the search.\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path
