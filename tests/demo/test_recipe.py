from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import demo
from demo.recipe import Recipe, recipe_hash


def test_hash_follows_recipe_fields():
    assert recipe_hash(Recipe()) == recipe_hash(Recipe())
    assert recipe_hash(Recipe()) != recipe_hash(dataclasses.replace(Recipe(), seed=1))
    assert recipe_hash(Recipe()) != recipe_hash(dataclasses.replace(Recipe(), lora_steps=1))


def test_hash_follows_source_files(tmp_path):
    package = tmp_path / "demo"
    shutil.copytree(Path(demo.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = recipe_hash(Recipe(), package)
    assert before == recipe_hash(Recipe())
    (package / "tasks.py").write_text((package / "tasks.py").read_text() + "\n# changed\n")
    assert recipe_hash(Recipe(), package) != before
