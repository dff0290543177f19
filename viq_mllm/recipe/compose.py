"""From YAML files and ``key=value`` overrides to a validated :class:`Recipe`, and back to YAML."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from viq_mllm.recipe.checks import check_layout
from viq_mllm.recipe.sections import RECIPE_KINDS, Recipe, RecipeError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; recipes mean a float (YAML 1.2 behaviour)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)


def _yaml(text: str, where: str):
    """Parse ``text``; malformed YAML becomes one :class:`RecipeError` naming ``where``, the line and column, and
    the problem (the key being read, when YAML knows it)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        context = getattr(error, "context", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{where}{at}: malformed YAML: {problem}" + (f" ({context})" if context else "")) from None


def load_recipe(path: str | Path, overrides: list[str] = (), world_size: Optional[int] = None) -> Recipe:
    """Read a YAML recipe (and its ``base`` files), apply ``key=value`` overrides, validate types and the
    parallel layout."""
    raw = read_composed(Path(path))
    for item in overrides:
        apply_override(raw, item)
    recipe = recipe_from_dict(raw)
    check_layout(recipe, world_size)
    return recipe


def read_composed(path: Path, including: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a dict, on top of the files its ``base`` key names (a path or a list, relative to the
    file; later ones win): sections merge key by key, anything else (lists included) is replaced. A model preset
    is such a file (``recipes/models/``): ``base: models/qwen2.5_0.5b.yaml`` then ``model: {seq_length: 8192}``."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}" + (f" (base of {including[-1]})" if including else ""))
    if path.resolve() in including:
        raise RecipeError(f"{path}: base files include each other ({' -> '.join(map(str, including))})")
    raw = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    bases = raw.pop("base", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merged(merged, read_composed(path.parent / base, (*including, path.resolve())))
    return _merged(merged, raw)


def _merged(below: dict, above: dict) -> dict:
    out = dict(below)
    for key, value in above.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as a YAML scalar."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is not of the form key=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = _yaml(value, f"override {item!r}") if value else ""


def recipe_from_dict(raw: dict) -> Recipe:
    """The recipe model of ``raw``'s kind (``text_lm`` when absent), validated."""
    kind = raw.get("kind", "text_lm")
    if kind not in RECIPE_KINDS:
        raise RecipeError(f"invalid recipe:\n  kind: {kind!r} is not one of {', '.join(RECIPE_KINDS)}")
    try:
        return RECIPE_KINDS[kind].model_validate({**raw, "kind": kind})
    except ValidationError as err:
        described = (_describe(RECIPE_KINDS[kind], e) for e in err.errors())
        raise RecipeError("invalid recipe:\n" + "\n".join(described)) from None


def _describe(recipe_class: type[BaseModel], error: dict) -> str:
    loc = error["loc"]
    field = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        hint = _did_you_mean(recipe_class, loc)
        return f"  {field}: unknown key{hint}"
    if error["type"] == "missing":
        return f"  {field}: required field is missing"
    return f"  {field}: {error['msg']} (got {error.get('input')!r})"


def _did_you_mean(recipe_class: type[BaseModel], loc: tuple) -> str:
    model: Any = recipe_class
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))}?)" if close else ""


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False))
