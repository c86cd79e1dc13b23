"""The recipe table of `mmgen train/finetune` (mmgen/commands.py): each entry names a real recipe; --help is light."""

import importlib
import inspect
import subprocess
import sys

import pytest

from mmgen import cli
from mmgen.commands import RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: f"{recipe.group}-{recipe.name}")
def test_each_recipe_names_a_module_with_train(recipe):
    module = importlib.import_module(f"mmgen.recipes.{recipe.module}")
    parameters = inspect.signature(module.train).parameters
    assert list(parameters)[:4] == ["config_path", "run_dir", "overrides", "resume"]
    assert ("base" in parameters) == (recipe.group == "finetune")
    assert "{run}" in recipe.hint


def test_every_recipe_is_a_subcommand(capsys):
    for group in ("train", "finetune"):
        assert cli.main([group, "--help"]) == 0
        listing = capsys.readouterr().out
        assert all(recipe.name in listing for recipe in RECIPES if recipe.group == group)
    for recipe in RECIPES:
        assert cli.main([recipe.group, recipe.name, "--help"]) == 0
        assert f"usage: mmgen {recipe.group} {recipe.name}" in capsys.readouterr().out
    assert cli.main(["train", "clip-classifier", "--help"]) == 2  # a finetune-only recipe
    assert len({(recipe.group, recipe.name) for recipe in RECIPES}) == len(RECIPES)


def test_help_does_not_import_torch():
    check = "import sys; from mmgen import cli; cli.build_parser(); assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
