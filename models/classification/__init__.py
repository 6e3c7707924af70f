"""Image classification for every family: the trainer with each paper's recipe, evaluation, the digits data set and
the reference model, and the measured speed/accuracy trade-off.

``tools/train_cls.py``, ``tools/eval_cls.py``, ``tools/make_digits.py`` and ``tools/tradeoff.py`` are thin command
lines over this package.
"""
from .data import DIGITS_DATA_CONFIG, DIGITS_IMG_SIZE, check_image_folder, load_split, write_digits
from .engine import TrainConfig, Trainer, create_classifier, data_config_for, evaluate, load_training_checkpoint
from .recipes import DISTILL_TYPES, RECIPES, Recipe, RecipeSettings, TrainStep, build_recipe

__all__ = [
    "DIGITS_DATA_CONFIG", "DIGITS_IMG_SIZE", "DISTILL_TYPES", "RECIPES", "Recipe", "RecipeSettings", "TrainConfig",
    "TrainStep", "Trainer", "build_recipe", "check_image_folder", "create_classifier", "data_config_for", "evaluate",
    "load_split", "load_training_checkpoint", "write_digits",
]
