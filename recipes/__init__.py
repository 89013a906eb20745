"""The shipped recipes, installed as the package `pipeline.recipes` (pyproject.toml maps this folder there).

This file only makes the folder a regular package: setuptools' editable install finds a package whose folder is
mapped elsewhere only when it has an `__init__.py`. `pipeline.core.recipe.installed_recipes` lists the YAML files.
"""
