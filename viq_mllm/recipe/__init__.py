"""Recipes: one YAML file is a whole run; ``key=value`` on the command line overrides any field.

A recipe is data, validated before any compute: unknown keys, wrong types and impossible parallel layouts
raise :class:`RecipeError` with a message that names the field, e.g.::

    >>> load_recipe("recipes/tiny_text_cpu.yaml", ["parallel.tp=3"], world_size=3)
    RecipeError: parallel.tp=3: model.num_attention_heads=4 is not divisible by it

Overrides are parsed as YAML scalars (``train.steps=6`` is an int, ``train.lr=3e-4`` a float,
``log.wandb=disabled`` a string) and then type-checked strictly: ``train.steps=six`` is rejected, never coerced.
"""

from viq_mllm.recipe.checks import check_layout, check_model_layout
from viq_mllm.recipe.compose import apply_override, dump_recipe, load_recipe, read_composed, recipe_from_dict
from viq_mllm.recipe.sections import (
    RECIPE_KINDS,
    CheckpointSection,
    CodesDataSection,
    CodeSource,
    DataSection,
    ImagesDataSection,
    InitSection,
    LogSection,
    ModelSection,
    ParallelSection,
    Recipe,
    RecipeError,
    RunSection,
    TextLMRecipe,
    TokenizerSpec,
    TrainSection,
    ViQRecipe,
    ViQSection,
    VisualSection,
    VLMRecipe,
)

__all__ = ["RECIPE_KINDS", "CheckpointSection", "CodeSource", "CodesDataSection", "DataSection", "ImagesDataSection",
           "InitSection", "LogSection", "ModelSection", "ParallelSection", "Recipe", "RecipeError", "RunSection",
           "TextLMRecipe", "TokenizerSpec", "TrainSection", "ViQRecipe", "ViQSection", "VLMRecipe", "VisualSection",
           "apply_override", "check_layout", "check_model_layout", "dump_recipe", "load_recipe", "read_composed", "recipe_from_dict"]
