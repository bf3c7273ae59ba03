"""What the augmentations are, whichever backend runs them (docs/method.md#augmentation,
docs/method.md#streams).

The host (PIL, `augment_host.py`) and device (JAX, `augment_device.py` and the modules it
uses) implementations share this: the RandAugment op registry and its magnitude table, the
default crop size and the parameters a run sets (`AugmentParams`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

from ssl_jax.data import views

CROP_SIZE = 60  # the reference's crop; `config.data.crop_size` overrides it
CUTOUT_FILL = (127, 127, 127)

# RandAugmentMC's pool (FixMatch's `fixmatch_augment_pool`), in the reference order. Each
# backend implements every op as a function of the same name (`bind_ops`).
RANDAUGMENT_OPS = (
    "auto_contrast",
    "brightness",
    "color",
    "contrast",
    "equalize",
    "identity",
    "posterize",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
)
# Ops whose magnitude gets a random sign (rotate, shears, translations).
SIGNED_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
PARAMETER_MAX = 10  # RandAugmentMC's magnitude scale: v/10 of each op's maximum


def bind_ops(module: types.ModuleType) -> dict[str, Callable]:
    """{op name: module.<op name>} in RANDAUGMENT_OPS order; a missing op is an error."""
    missing = [name for name in RANDAUGMENT_OPS if not callable(getattr(module, name, None))]
    if missing:
        raise AttributeError(f"{module.__name__} lacks RandAugment ops {missing}")
    return {name: getattr(module, name) for name in RANDAUGMENT_OPS}


def _float_parameter(v: int, max_v: float) -> float:
    return float(v) * max_v / PARAMETER_MAX


def _int_parameter(v: int, max_v: float) -> int:
    return int(v * max_v / PARAMETER_MAX)


def op_parameter(name: str, v: int, sign: int = 1, width: int = 60, height: int = 60):
    """The magnitude table of docs/method.md#randaugment: the parameter op `name` gets for magnitude
    v (1..9).

    Written with the reference's own arithmetic (v * max / 10 + bias, int() truncation), so
    float rounding matches it; `sign` (+1/-1) only affects the signed ops.
    """
    if name in ("auto_contrast", "equalize", "identity"):
        return None
    if name in ("brightness", "color", "contrast", "sharpness"):
        return _float_parameter(v, 0.9) + 0.05
    if name == "posterize":
        return _int_parameter(v, 4) + 4
    if name == "solarize":
        return 256 - _int_parameter(v, 256)
    if name == "rotate":
        return sign * _int_parameter(v, 30)
    if name in ("shear_x", "shear_y"):
        return sign * _float_parameter(v, 0.3)
    if name == "translate_x":
        return int(sign * _float_parameter(v, 0.3) * width)
    if name == "translate_y":
        return int(sign * _float_parameter(v, 0.3) * height)
    raise ValueError(f"unknown RandAugment op {name!r}")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """A run's augmentation settings, as both backends take them."""

    crop_size: int = CROP_SIZE  # side of every training and test view
    randaugment_n: int = 2  # RandAugmentMC(n, m) of the u_s0 view, with a cutout of
    # nominal size `cutout` (drawn (cutout+1)^2, docs/method.md#q12-cutout-size)
    randaugment_m: int = 10
    cutout: int = 16

    @classmethod
    def from_config(cls, config) -> AugmentParams:
        """From `config.data.crop_size` and `config.augment` (configs/base.py)."""
        return cls(
            crop_size=int(config.data.crop_size),
            randaugment_n=int(config.augment.randaugment_n),
            randaugment_m=int(config.augment.randaugment_m),
            cutout=int(config.augment.cutout),
        )

    def view_kwargs(self, view: str) -> dict:
        """The keyword arguments of view `view`'s stream function, on either backend."""
        kwargs = {"crop_size": self.crop_size}
        if view == views.STRONG0:
            kwargs.update(n=self.randaugment_n, m=self.randaugment_m, cutout=self.cutout)
        return kwargs


DEFAULT_PARAMS = AugmentParams()  # the reference's settings (configs/base.py)
