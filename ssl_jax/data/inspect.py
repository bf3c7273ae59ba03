"""`--mode inspect`: what a run would train on, before spending hours on it.

Prints the dataset summary (set sizes, per-class counts, image sizes, protocol, split hash) as
one JSON object on the **last line** of stdout and draws `<workdir>/augmentations.png`: a few
images, each as loaded (Resize(64)) and in the four training streams (x, u_w, u_s0, u_s1) at
`config.data.crop_size`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ssl_jax.data import augment_host
from ssl_jax.data.augment_spec import AugmentParams
from ssl_jax.data.protocols import load_dataset
from ssl_jax.data.views import INSPECT_STREAM


def augmentation_grid(data, config, path: str, num_images: int = 6) -> str:
    """Rows: one image per class (first num_images classes); columns: original + 4 streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = data.unlabelled if len(data.unlabelled) else data.train
    rows = []
    for c in range(len(data.class_names)):
        members = np.flatnonzero(np.asarray(source.labels) == c)
        if len(members):
            rows.append(int(members[0]))
        if len(rows) == num_images:
            break
    params = AugmentParams.from_config(config)
    columns = ["original", *augment_host.STREAMS]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(1.6 * len(columns), 1.6 * len(rows)), squeeze=False
    )
    for r, index in enumerate(rows):
        image = source.images[index]
        for col, name in enumerate(columns):
            if name == "original":
                shown = image
            else:
                rng = np.random.default_rng([int(config.seed), INSPECT_STREAM, r, col])
                shown = augment_host.view_fn(name, params)(image, rng)
            ax = axes[r][col]
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name}\n{shown.shape[0]}x{shown.shape[1]}", fontsize=8)
            if col == 0:
                ax.set_ylabel(data.class_names[source.labels[index]], fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_inspect(config, workdir: str) -> dict:
    """Loads the data as training would, draws the figure, prints the summary JSON last."""
    data = load_dataset(config, workdir=workdir)
    summary = data.summary()
    summary["augmentations"] = augmentation_grid(
        data, config, os.path.join(workdir, "augmentations.png")
    )
    summary["split_json"] = os.path.join(workdir, "split.json")
    print(json.dumps(summary, sort_keys=False), flush=True)
    return summary
