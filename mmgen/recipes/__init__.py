"""Recipes: a config schema plus the code that turns it into datasets, a model and a Trainer run."""
