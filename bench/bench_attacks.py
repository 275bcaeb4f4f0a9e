"""Benchmark medrobust's FGSM, PGD-L∞ and C&W-L2 against torchattacks on the same model,
batch and device, in one run.

Model: medrobust's ResNet18 image classifier (1 input channel, 2 classes,
random weights, eval mode) on a batch of random 1x64x64 images in [0, 1].
Rows, timed interleaved in the same run:

- baselines: a plain forward under `torch.inference_mode`, and a plain forward
  + backward to the input (`torch.autograd.grad` of the cross-entropy with
  respect to the images, parameters frozen): the work of one gradient step;
- FGSM: `build_attack("fgsm")` vs `torchattacks.FGSM`;
- PGD-L∞, `--pgd-steps` steps of 2/255 from a random start: `build_attack("pgd")`
  vs `torchattacks.PGD` (same eps, step, steps);
- C&W-L2, `--cw-steps` Adam steps at a fixed c = 1, lr 0.01:
  `build_attack("cw_l2")` with one binary-search step, no early abort and an
  L2 budget larger than any image difference, vs `torchattacks.CW` (which has
  no binary search). torchattacks' CW stops as soon as its loss rises at a
  check (every steps/10 steps), which on this random-weight model happens at
  step 1 with kappa 0; kappa = `--cw-kappa` (default 1e4) keeps the margin term
  from saturating, so its loss keeps falling and both run every step (the
  model calls of each row are printed to show it).

The ratio column is torchattacks' time / medrobust's time (throughput ratio,
>= 1 means medrobust is at least as fast).

    .venv/bin/python bench/bench_attacks.py
    .venv/bin/python bench/bench_attacks.py --device cuda --batch-size 128 --image-size 128
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from medrobust.attacks import build_attack
from medrobust.models.image_classifiers import resnet18
from timing import interleaved_medians, machine_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=8.0, help="L∞ budget, in 1/255 units")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--cw-steps", type=int, default=10)
    parser.add_argument("--cw-kappa", type=float, default=1e4)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        import torchattacks
    except ImportError:
        sys.exit("bench_attacks.py needs torchattacks: pip install -e '.[test]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    print(machine_line(f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
                       f"device {device}"))

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = resnet18(num_classes=2, in_channels=1).eval().to(device)
    model.requires_grad_(False)  # every row runs on the same frozen model
    size = args.image_size
    images = torch.rand(args.batch_size, 1, size, size, generator=generator).to(device)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator).to(device)
    eps = args.epsilon / 255
    whole_image = math.sqrt(size * size)  # an L2 budget no perturbation in [0, 1] exceeds

    ours = {
        "fgsm": build_attack("fgsm", model, args.epsilon),
        "pgd": build_attack("pgd", model, args.epsilon, {"steps": args.pgd_steps, "step_size": 2}),
        "cw": build_attack("cw_l2", model, whole_image, {
            "binary_search_steps": 1, "steps": args.cw_steps, "initial_const": 1.0,
            "learning_rate": 0.01, "kappa": args.cw_kappa, "abort_early": False}),
    }
    reference = {
        "fgsm": torchattacks.FGSM(model, eps=eps),
        "pgd": torchattacks.PGD(model, eps=eps, alpha=2 / 255, steps=args.pgd_steps,
                                random_start=True),
        "cw": torchattacks.CW(model, c=1.0, kappa=args.cw_kappa, steps=args.cw_steps, lr=0.01),
    }

    def synced(function: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    def forward_backward() -> None:
        x = images.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), labels)
        torch.autograd.grad(loss, x)

    functions = {"forward": forward, "forward_backward": forward_backward}
    for key in ours:
        functions[f"{key}_medrobust"] = (lambda attack: lambda: attack(images, labels))(ours[key])
        functions[f"{key}_torchattacks"] = (lambda attack: lambda: attack(images, labels))(
            reference[key])
    if device.type == "cuda":
        # torchattacks 3.3's CW indexes a CPU `torch.eye` with the CUDA labels, which fails;
        # made under `torch.device`, the eye is on the GPU (the later `.to` is then a no-op)
        functions["cw_torchattacks"] = (lambda run: lambda: _on_device(run, device))(
            functions["cw_torchattacks"])
    functions = {name: synced(function) for name, function in functions.items()}
    calls = count_model_calls(model, functions)
    medians = interleaved_medians(functions, args.repeats)

    print(f"\nResNet18 (medrobust image classifier, random weights), batch {args.batch_size} x "
          f"1x{size}x{size} on {device}, eps {args.epsilon:g}/255, C&W kappa {args.cw_kappa:g}, "
          f"median of {args.repeats}")
    names = {
        "forward": "baseline: forward (inference_mode)",
        "forward_backward": "baseline: forward + backward to the input",
        "fgsm_torchattacks": "torchattacks FGSM",
        "fgsm_medrobust": "medrobust FGSM",
        "pgd_torchattacks": f"torchattacks PGD, {args.pgd_steps} steps",
        "pgd_medrobust": f"medrobust PGD-L∞, {args.pgd_steps} steps",
        "cw_torchattacks": f"torchattacks CW, {args.cw_steps} steps, c=1",
        "cw_medrobust": f"medrobust C&W-L2, 1x{args.cw_steps} steps, c=1",
    }
    print(f"  {'':44s} {'median ms':>10s} {'images/s':>9s} {'x fwd+bwd':>10s} "
          f"{'model calls':>12s} {'ratio':>6s}")
    for key, name in names.items():
        seconds = medians[key]
        ratio = ""
        if key.endswith("_medrobust"):
            ratio = f"{medians[key.replace('_medrobust', '_torchattacks')] / seconds:6.2f}"
        print(f"  {name:44s} {seconds * 1e3:10.1f} {args.batch_size / seconds:9.1f} "
              f"{seconds / medians['forward_backward']:10.2f} {calls[key]:12d} {ratio:>6s}")
    print("  ratio = torchattacks time / medrobust time (throughput ratio; >= 1: medrobust "
          "at least as fast)")
    for key in ours:
        if calls[f"{key}_medrobust"] != calls[f"{key}_torchattacks"]:
            print(f"  note: {key}: the two ran a different number of model calls, so its ratio "
                  "is not at equal work")


def _on_device(function: Callable[[], object], device: torch.device) -> object:
    with torch.device(device):
        return function()


def count_model_calls(model: torch.nn.Module, functions) -> dict[str, int]:
    """Model forward calls of one run of each function (also its warm-up)."""
    counter = {"calls": 0}

    def hook(*_):
        counter["calls"] += 1

    handle = model.register_forward_hook(hook)
    counts = {}
    try:
        for name, function in functions.items():
            counter["calls"] = 0
            function()
            counts[name] = counter["calls"]
    finally:
        handle.remove()
    return counts


if __name__ == "__main__":
    sys.exit(main())
