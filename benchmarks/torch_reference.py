"""PyTorch eager reference for ssl_jax's CPU step timings (not a project dependency).

Run it from a separate virtual environment that has torch, anywhere (``$TORCH_VENV`` below):
``python3 -m venv $TORCH_VENV && $TORCH_VENV/bin/pip install torch==2.13.0 numpy``, then

    $TORCH_VENV/bin/python benchmarks/torch_reference.py --batch 8 --mu 2
    $TORCH_VENV/bin/python benchmarks/torch_reference.py --batch 32 --mu 7 --steps 5
    $TORCH_VENV/bin/python benchmarks/torch_reference.py --forward-backward 56,64,704

Without torch it prints one JSON line saying so and exits 0.

The model is torchvision's ResNet-18 written out (7x7/2 stem, 3x3/2 max-pool, BasicBlocks,
512 -> 10 classifier, 512 -> 2048 -> 64 projection, L2 norm), as ssl_jax's `ResNet18`, in
train mode, NCHW float32, at 60x60. The step is what the paper's toolbox does per iteration,
minus the CoMatch/triplet losses themselves: forward the B + 3*mu*B images at once,
loss = cross-entropy on the first B logits + a simple function of the embeddings (the mean
squared inner product of the embeddings of two unlabelled views), backward, SGD with Nesterov
momentum and weight decay, and (``--ema``, on by default, as ssl_jax) the EMA model update.
The CoMatch/triplet losses work on (B*mu) x (B*mu + bank) matrices of 64-dim embeddings plus a
(B*mu)^3 triplet mask: tens of MFLOPs against ResNet-18's ~0.1 GFLOP per 60 px image forward,
i.e. well under 1% of the step; they are not reproduced here.

``--forward-backward N,..`` times the ResNet-18 forward + backward alone (gradient of
``sum(logits) + sum(z)``, train mode, no optimizer), as benchmarks/conv_cpu.py does for ssl_jax.
Each timing: warm-up, then ``--steps`` timed one by one; median (and min) in ms, with the
most cores other processes kept busy during a kept step (``--max-others 0.2`` retries steps
run beside a busy neighbour).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import cpu_load  # benchmarks/cpu_load.py, beside this script

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # the project venv has no torch
    torch = None


def build_resnet18(num_classes: int = 10, low_dim: int = 64, hidden: int = 2048):
    """torchvision's resnet18 (BasicBlock, [2, 2, 2, 2]) with the CoMatch heads."""

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            residual = x if self.downsample is None else self.downsample(x)
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + residual)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            blocks, cin = [], 64
            for stage in range(4):
                cout = 64 * 2**stage
                for index in range(2):
                    blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*blocks)
            self.classifier = nn.Linear(512, num_classes)
            self.proj_fc1 = nn.Linear(512, hidden)
            self.proj_fc2 = nn.Linear(hidden, low_dim)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
            h = torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)
            z = self.proj_fc2(F.relu(self.proj_fc1(h)))
            return self.classifier(h), F.normalize(z, dim=1)

    return ResNet18()


def timed(function, steps: int, warmup: int, max_others: float = 0.0, max_wait_s: float = 600):
    """Wall seconds of ``steps`` calls after ``warmup``, and the worst neighbour load seen.

    With ``max_others`` > 0 a call during which other processes kept more than that many
    cores busy (from /proc/stat, two 10 ms ticks of slack) is retried, for up to
    ``max_wait_s`` in all: torch's OpenMP threads spin-wait, so a busy neighbour core can
    triple a 2-thread step.
    """
    for _ in range(warmup):
        function()
    deadline = time.monotonic() + max_wait_s
    times, worst = [], 0.0
    while len(times) < steps:
        start = cpu_load.mark()
        function()
        wall, others = cpu_load.others_since(start, slack_ticks=2)
        if max_others > 0 and others > max_others and time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        times.append(wall)
        worst = max(worst, others)
    return times, worst


def summary(times: list[float], others: float) -> dict:
    return {
        "ms_median": round(1e3 * statistics.median(times), 1),
        "ms_min": round(1e3 * min(times), 1),
        "others_cores_max": round(others, 2),
    }


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def train_step_benchmark(args) -> dict:
    torch.manual_seed(0)
    model = build_resnet18().train()
    ema = build_resnet18().train()
    ema.load_state_dict(model.state_dict())
    ema_params = [p.detach() for p in ema.parameters()]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "bn" in name or "bias" in name or "downsample.1" in name else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.03,
        momentum=0.9,
        nesterov=True,
    )
    b, unlabelled = args.batch, args.mu * args.batch
    images = torch.rand(b + 3 * unlabelled, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (b,))

    def step():
        logits, z = model(images)
        loss = F.cross_entropy(logits[:b], labels)
        z_weak, z_strong = z[b : b + unlabelled], z[b + unlabelled : b + 2 * unlabelled]
        loss = loss + (z_weak @ z_strong.T).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.ema:
            with torch.no_grad():
                params = [p.detach() for p in model.parameters()]
                torch._foreach_mul_(ema_params, 0.999)
                torch._foreach_add_(ema_params, params, alpha=0.001)

    times, others = timed(step, args.steps, args.warmup, args.max_others)
    return {
        "benchmark": "torch_resnet18_train_step",
        "batch": b,
        "mu": args.mu,
        "images_per_step": b + 3 * unlabelled,
        "image_size": args.image_size,
        "ema": args.ema,
        "steps": args.steps,
        **summary(times, others),
        **environment(),
    }


def forward_backward_benchmark(num_images: int, args) -> dict:
    torch.manual_seed(0)
    model = build_resnet18().train()
    images = torch.rand(num_images, 3, args.image_size, args.image_size)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        logits, z = model(images)
        (logits.sum() + z.sum()).backward()

    times, others = timed(forward_backward, args.steps, args.warmup, args.max_others)
    return {
        "benchmark": "torch_resnet18_forward_backward",
        "images": num_images,
        "image_size": args.image_size,
        "steps": args.steps,
        **summary(times, others),
        **environment(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mu", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.0,
        help="retry steps during which other processes used more cores than this (0: never)",
    )
    parser.add_argument(
        "--forward-backward", default="", help="image counts, e.g. 56,64,704: fwd+bwd only"
    )
    args = parser.parse_args(argv)
    if torch is None:
        print(
            json.dumps(
                {"skipped": "torch is not installed in this Python", "python": sys.executable}
            )
        )
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.forward_backward:
        for count in args.forward_backward.split(","):
            print(json.dumps(forward_backward_benchmark(int(count), args)), flush=True)
    else:
        print(json.dumps(train_step_benchmark(args)), flush=True)


if __name__ == "__main__":
    main()
