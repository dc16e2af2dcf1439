"""Deprecated: the modern recipe is `gptforge.model.GPT` with `RECIPES["modern"]`'s switches."""

from gptforge.model import GPT as Modern
from gptforge.model import RECIPES, ModernConfig

NORM_EPS = RECIPES["modern"]["norm_eps"]

__all__ = ["Modern", "ModernConfig", "NORM_EPS"]
