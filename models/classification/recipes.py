"""Each paper's training recipe as a named option of the classification trainer, with the paper's defaults.

A recipe decides what a training step computes from a batch and what the model's reduction knob is at each step:

* ``none``: the criterion on the logits (timm's label-smoothing or soft-target cross-entropy).
* ``evit``: EViT's keep-rate warm-up (official ``adjust_keep_rate``, ``tokenzoo.evit.keep_rate_schedule``): keep rate
  1 for ``keep_rate_start_epoch`` epochs (official ``--shrink_start_epoch 10``), then a cosine per step down to the
  target over ``keep_rate_epochs`` epochs (``--shrink_epochs 100``; the paper trains 300 epochs). Validation runs at
  the target keep rate, the model that is deployed.
* ``mctf``: MCTF's token-reduction consistency training (``tokenzoo.mctf.consistency_training_loss``: student at r,
  teacher at r' < ``mctf_r_teacher_max`` = 8, weights 1 / 1 / 3, confidence 0.4: the official ``--mctf_type
  [16,8,...] --task_type [1,1,0.4] --task_weight [1.0,1.0,3.0]``), on the label-smoothed targets.
* ``sparsifiner-predictor`` and ``sparsifiner-backbone``: Sparsifiner's two phases (``tokenzoo.sparsifiner``), run as
  two trainings one after the other, as the official code runs them with one optimizer each: the connectivity
  predictors alone on the attention distillation loss, then the backbone with the predictors frozen on CE + KL
  distillation + token distillation. Both need the dense teacher (``--teacher``: the DeiT the model started from).
* ``lookupvit``: multi-resolution training (``tokenzoo.lookupvit.multi_resolution_size``): each step draws its
  compressed grid from 3, 5, 7, 10 squared (the same on every rank); the loss is the mean of the criterion on the two
  heads (both are trained; the model predicts with their average). Validation runs at the model's own compressed
  size.

DeiT's hard distillation (``distill="hard"``) works with any family through its classification head (the families
protect exactly one CLS token, so there is no distillation token): (1 - alpha) * criterion(logits, targets) + alpha *
CE(logits, teacher's argmax), alpha 0.5, the teacher run on the same (mixed) images. It composes with ``none``,
``evit`` and ``lookupvit``; MCTF and Sparsifiner have their own teacher terms.

``TrainStep`` wraps model + recipe as one module whose ``forward`` returns the loss, so that DistributedDataParallel
sees every parameter use of a step inside its forward (the recipes call more than ``model.forward``).
"""
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..evit import EViT, keep_rate_schedule
from ..lookupvit import MULTI_RESOLUTION_SIZES, LookupViT, multi_resolution_size
from ..mctf import MCTF, consistency_training_loss
from ..sparsifiner import (Sparsifiner, backbone_distillation_loss, predictor_distillation_loss, set_training_phase,
                           teacher_outputs)

__all__ = ["DISTILL_TYPES", "RECIPES", "Recipe", "RecipeSettings", "TrainStep", "build_recipe"]

DISTILL_TYPES = ("none", "hard")
Loss = Tuple[torch.Tensor, Dict[str, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RecipeSettings:
    """The recipes' knobs; every default is the paper's (official code's) setting."""

    keep_rate: Optional[float] = None  # EViT target; None: the model's own keep rate
    keep_rate_start_epoch: float = 10.0
    keep_rate_epochs: float = 100.0
    mctf_r_teacher_max: int = 8
    mctf_weights: Tuple[float, float, float] = (1.0, 1.0, 3.0)
    mctf_confidence: float = 0.4
    lookup_sizes: Tuple[int, ...] = MULTI_RESOLUTION_SIZES
    distill: str = "none"
    distill_alpha: float = 0.5
    label_smoothing: float = 0.1  # what MCTF's own cross-entropies use (hard targets)
    seed: int = 0


class Recipe:
    """Plain supervised training (``none``); the base of the family recipes.

    Subclasses declare the model class they train (``model_type``) and override the hooks they need.
    """

    name: ClassVar[str] = "none"
    model_type: ClassVar[Optional[type]] = None
    needs_teacher: ClassVar[bool] = False  # a teacher model is part of the recipe itself
    takes_hard_distill: ClassVar[bool] = True

    def __init__(self, settings: RecipeSettings, model: nn.Module) -> None:
        """Check that the recipe fits ``model`` and its settings (ValueError otherwise), before any training."""
        self.settings = settings
        if self.model_type is not None and not isinstance(model, self.model_type):
            raise ValueError(f"recipe {self.name!r} trains {self.model_type.__name__} models, got "
                             f"{type(model).__name__}; use --recipe none for other models")
        if settings.distill not in DISTILL_TYPES:
            raise ValueError(f"distill must be one of {DISTILL_TYPES}, got {settings.distill!r}")
        if settings.distill != "none" and not self.takes_hard_distill:
            raise ValueError(f"recipe {self.name!r} has its own teacher terms; --distill {settings.distill} composes "
                             f"only with the recipes none, evit and lookupvit")
        if not isinstance(settings.distill_alpha, Real) or not 0.0 <= settings.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {settings.distill_alpha!r}")

    @property
    def uses_teacher(self) -> bool:
        return self.needs_teacher or self.settings.distill != "none"

    def prepare(self, model: nn.Module) -> None:
        """Set up the model once before training (e.g. what trains); the optimizer takes what requires grad."""

    def before_step(self, model: nn.Module, epoch: float, step: int) -> Dict[str, float]:
        """Set the model's knobs for a training step at fractional ``epoch`` and global ``step``; returns them for
        the log."""
        return {}

    def for_eval(self, model: nn.Module) -> None:
        """Put the model's knobs at the setting it is evaluated and deployed with."""

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> Any:
        """What the loss needs from the teacher for these images (hard distillation: its labels)."""
        return teacher(images).argmax(dim=-1)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
             teacher: Any = None) -> Loss:
        """The step's loss and its named parts (for the log)."""
        return self._supervised(model(images), targets, criterion, teacher)

    def _supervised(self, logits: torch.Tensor, targets: torch.Tensor, criterion: Criterion, teacher: Any) -> Loss:
        """criterion(logits, targets), mixed with DeiT's hard distillation when a teacher's labels are given."""
        base = criterion(logits, targets)
        if teacher is None or self.settings.distill == "none":
            return base, {}
        alpha = self.settings.distill_alpha
        distill = F.cross_entropy(logits, teacher)
        return (1 - alpha) * base + alpha * distill, dict(base=base.detach(), distill=distill.detach())


class EViTRecipe(Recipe):
    """EViT's keep-rate warm-up; see the module docstring."""

    name = "evit"
    model_type = EViT

    def __init__(self, settings: RecipeSettings, model: nn.Module) -> None:
        super().__init__(settings, model)
        self.target = model.keep_rate if settings.keep_rate is None else settings.keep_rate
        keep_rate_schedule(0.0, self.target, settings.keep_rate_start_epoch, settings.keep_rate_epochs)  # checks

    def before_step(self, model: nn.Module, epoch: float, step: int) -> Dict[str, float]:
        keep_rate = keep_rate_schedule(epoch, self.target, self.settings.keep_rate_start_epoch,
                                       self.settings.keep_rate_epochs)
        model.set_keep_rate(keep_rate)
        return dict(keep_rate=keep_rate)

    def for_eval(self, model: nn.Module) -> None:
        model.set_keep_rate(self.target)


class MCTFRecipe(Recipe):
    """MCTF's token-reduction consistency training; see the module docstring."""

    name = "mctf"
    model_type = MCTF
    takes_hard_distill = False

    def __init__(self, settings: RecipeSettings, model: nn.Module) -> None:
        super().__init__(settings, model)
        if not isinstance(model.r, int):
            raise ValueError(f"recipe 'mctf' (consistency training) needs an MCTF model with an int r (tokens fused "
                             f"per block, e.g. mctf_small's 16), got r={model.r!r}")
        r_max = settings.mctf_r_teacher_max
        if isinstance(r_max, bool) or not isinstance(r_max, Integral) or r_max < 1:
            raise ValueError(f"mctf_r_teacher_max must be an int >= 1, got {r_max!r}")
        if len(settings.mctf_weights) != 3:
            raise ValueError(f"mctf_weights takes 3 weights (student CE, teacher CE, consistency), got "
                             f"{settings.mctf_weights!r}")

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
             teacher: Any = None) -> Loss:
        s = self.settings
        out = consistency_training_loss(model, images, targets, r_teacher_max=s.mctf_r_teacher_max,
                                        weights=tuple(s.mctf_weights), confidence_threshold=s.mctf_confidence,
                                        label_smoothing=s.label_smoothing)
        return out["loss"], {key: value.detach() for key, value in out.items() if key != "loss"}


class SparsifinerPredictorRecipe(Recipe):
    """Sparsifiner's first phase: the connectivity predictors learn the dense teacher's attention."""

    name = "sparsifiner-predictor"
    model_type = Sparsifiner
    needs_teacher = True
    takes_hard_distill = False
    phase = "predictor"

    def prepare(self, model: nn.Module) -> None:
        set_training_phase(model, self.phase)

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> Any:
        return teacher_outputs(teacher, images)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
             teacher: Any = None) -> Loss:
        return predictor_distillation_loss(model.forward_train(images)["approx_attn"], teacher["attn"]), {}


class SparsifinerBackboneRecipe(SparsifinerPredictorRecipe):
    """Sparsifiner's second phase: the backbone on sparse attention, distilled from the dense teacher."""

    name = "sparsifiner-backbone"
    phase = "backbone"

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
             teacher: Any = None) -> Loss:
        loss, parts = backbone_distillation_loss(model.forward_train(images), targets, teacher, criterion)
        return loss, {key: value.detach() for key, value in parts.items()}


class LookupViTRecipe(Recipe):
    """LookupViT's multi-resolution training on both heads; see the module docstring."""

    name = "lookupvit"
    model_type = LookupViT

    def __init__(self, settings: RecipeSettings, model: nn.Module) -> None:
        super().__init__(settings, model)
        self.eval_size = model.compressed_size
        multi_resolution_size(0, settings.lookup_sizes, settings.seed)  # checks the sizes
        grid = model.grid_size(model.patch_embed.img_size)
        too_big = [s for s in settings.lookup_sizes if s > min(grid)]
        if too_big:
            raise ValueError(f"lookup_sizes {too_big} do not fit in the {grid[0]}x{grid[1]} patch grid of the "
                             f"model's input: each compressed side must be at most {min(grid)}")

    def before_step(self, model: nn.Module, epoch: float, step: int) -> Dict[str, float]:
        size = multi_resolution_size(step, self.settings.lookup_sizes, self.settings.seed)
        model.set_compressed_size(size)
        return dict(compressed_size=size[0])

    def for_eval(self, model: nn.Module) -> None:
        model.set_compressed_size(self.eval_size)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
             teacher: Any = None) -> Loss:
        lookup_logits, compressed_logits = model(images, both_heads=True)
        lookup, _ = self._supervised(lookup_logits, targets, criterion, teacher)
        compressed, _ = self._supervised(compressed_logits, targets, criterion, teacher)
        return (lookup + compressed) / 2, dict(lookup=lookup.detach(), compressed=compressed.detach())


_RECIPE_CLASSES = {cls.name: cls for cls in (Recipe, EViTRecipe, MCTFRecipe, SparsifinerPredictorRecipe,
                                             SparsifinerBackboneRecipe, LookupViTRecipe)}
RECIPES = tuple(_RECIPE_CLASSES)


def build_recipe(name: str, model: nn.Module, settings: Optional[RecipeSettings] = None) -> Recipe:
    """The recipe ``name`` for ``model``, checked against it (ValueError for an unknown name or a model it does not
    train)."""
    if name not in _RECIPE_CLASSES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    return _RECIPE_CLASSES[name](settings or RecipeSettings(), model)


class TrainStep(nn.Module):
    """Model + recipe + criterion as one module: ``forward(images, targets, teacher)`` returns (loss, parts).

    Wrap this, not the model, in DistributedDataParallel: the recipes call ``forward_features``, ``forward_train`` or
    the model twice, and DDP synchronizes gradients only for what runs inside its own ``forward``.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.criterion = criterion

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher: Any = None) -> Loss:
        return self.recipe.loss(self.model, images, targets, self.criterion, teacher)
