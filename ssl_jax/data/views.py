"""The training views by name, and every random stream id of the input pipeline, in one place.

A training step sees the labelled view ``x`` and up to three views of one unlabelled batch
(docs/method.md#augmentation): ``u_w`` (weak), ``u_s0`` (strong, RandAugment) and ``u_s1`` (strong,
colour jitter). The algorithms name the views they forward (``Algorithm.unlabelled_views``),
the host pipeline (`pipeline.py`, `augment_host.py`) and the device pipeline (`on_device.py`,
`augment_device.py`) make them; all of them use the names declared here.

Each view draws its randomness from its own stream, so a view never depends on which other
views were asked for. The ids are part of the data order: changing one changes every
augmentation of a run (and a resumed run would no longer match its first part).
"""

from __future__ import annotations

import dataclasses

LABELLED = "x"
WEAK = "u_w"
STRONG0 = "u_s0"
STRONG1 = "u_s1"


@dataclasses.dataclass(frozen=True)
class View:
    name: str
    pool: str  # the set it is drawn from: "labelled" or "unlabelled"
    recipe: str  # the torchvision pipeline it reproduces (docs/method.md#augmentation)
    host_stream: int  # host: example j at step k uses default_rng([seed, host_stream, k, j])
    device_stream: int  # device: the view's key is fold_in(step key, device_stream)


VIEWS: dict[str, View] = {
    v.name: v
    for v in (
        View(LABELLED, "labelled", "HFlip -> RandomResizedCrop", 10, 0),
        View(WEAK, "unlabelled", "HFlip -> CenterCrop", 11, 1),
        View(STRONG0, "unlabelled", "HFlip -> RandomResizedCrop -> RandAugmentMC + cutout", 12, 2),
        View(STRONG1, "unlabelled", "RandomResizedCrop -> HFlip -> ColorJitter -> Gray", 13, 3),
    )
}
UNLABELLED_VIEWS = tuple(name for name, v in VIEWS.items() if v.pool == "unlabelled")

# The batch keys holding each pool's sampled indices, and the host sampler's stream per pool:
# the pool's permutation of pass p is default_rng([seed, sample_stream, p]).
INDEX_KEYS = {"labelled": "x_index", "unlabelled": "u_index"}
SAMPLE_STREAMS = {"labelled": 1, "unlabelled": 2}
# `--mode inspect` draws its figure from a stream apart from every training stream.
INSPECT_STREAM = 999
