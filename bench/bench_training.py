"""Benchmark one training step with the denoising defense against one plain step, on the
same model, batch, optimiser and device, in one run.

Model: medrobust's ResNet18 image classifier (`--channels` input channels, 2
classes, random weights, train mode) on a batch of random images in [0, 1].
Rows, timed interleaved in the same run, each one whole optimiser step
(zero_grad, loss, backward, step; the optimiser built by the trainer's
`TrainingConfig.make_optimizer`):

- plain: cross-entropy on the clean batch (`defense: none`), over the
  classifier's parameters;
- explain: the same plain step on the doubled batch (the clean images and as
  many more), the work the defense cannot avoid: it classifies clean and noisy;
- denoising, `distance` l2 and mse: `DenoisingDefense.loss` (clean and noisy
  through the classifier in one pass, the decoder on the low features, CE on
  both, Ln, La) over the classifier's and the decoder's parameters.

The column "x plain" is the row's time / the plain step's (a cost multiple;
the goal for the defended step is <= 2.5).

    .venv/bin/python bench/bench_training.py
    .venv/bin/python bench/bench_training.py --threads 1 --cpu-time --repeats 11
    .venv/bin/python bench/bench_training.py --image-size 224 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

from medrobust.models.denoising import DenoisingClassifier, DenoisingDefense
from medrobust.models.image_classifiers import resnet18
from medrobust.models.registry import NoDefense
from medrobust.train.image_classifier import TrainingConfig
from timing import interleaved_medians, machine_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU seconds of this process, not wall-clock: with --threads 1 "
                             "on a shared machine, the work rather than the wait for a core")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.cpu_time and device.type == "cuda":
        parser.error("--cpu-time measures CPU work; steps on a GPU need wall-clock")
    print(machine_line(f"torch {torch.__version__}, device {device}"))

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = DenoisingClassifier(resnet18(num_classes=2, in_channels=args.channels))
    model.train().to(device)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    images = torch.rand(shape, generator=generator).to(device)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator).to(device)
    doubled = (torch.cat([images, images.flip(0)]), torch.cat([labels, labels.flip(0)]))
    noise = torch.Generator(device=device).manual_seed(0)
    training = TrainingConfig(epochs=1, batch_size=args.batch_size, learning_rate=1e-3,
                              weight_decay=1e-4, optimizer=args.optimizer)
    # separate optimisers: the plain step must not carry the decoder's parameters
    plain_optimizer = training.make_optimizer(model.classifier.parameters())
    defended_optimizer = training.make_optimizer(model.parameters())

    def step(defense, net, optimizer, batch) -> Callable[[], None]:
        def run() -> None:
            loss, _ = defense.loss(net, *batch, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    functions = {
        "plain": step(NoDefense(), model.classifier, plain_optimizer, (images, labels)),
        "plain_doubled": step(NoDefense(), model.classifier, plain_optimizer, doubled),
        **{f"denoising_{distance}": step(
            DenoisingDefense(lambda_n=1.0, lambda_a=10.0, noise_sigma=8 / 255,
                             distance=distance), model, defended_optimizer, (images, labels))
           for distance in ("l2", "mse")},
    }
    clock = time.process_time if args.cpu_time else time.perf_counter
    medians = interleaved_medians(functions, args.repeats, clock)

    print(f"\nResNet18 (medrobust image classifier, random weights, train mode), batch "
          f"{args.batch_size} x {args.channels}x{args.image_size}x{args.image_size} on {device}, "
          f"{'AdamW' if args.optimizer == 'adam' else 'SGD'}, median of {args.repeats}, "
          f"{'CPU time' if args.cpu_time else 'wall-clock'}")
    names = {
        "plain": "plain step: CE on clean",
        "plain_doubled": "explain: plain step on 2x the batch",
        "denoising_l2": "denoising step, distance l2 (lambda 1, 10)",
        "denoising_mse": "denoising step, distance mse (lambda 1, 10)",
    }
    print(f"  {'':44s} {'median ms':>10s} {'images/s':>9s} {'x plain':>8s}")
    for key, name in names.items():
        seconds = medians[key]
        print(f"  {name:44s} {seconds * 1e3:10.1f} {args.batch_size / seconds:9.1f} "
              f"{seconds / medians['plain']:8.2f}")
    print("  images/s counts the batch's clean images; x plain = row time / plain step time "
          "(goal for the denoising step: <= 2.5)")


if __name__ == "__main__":
    sys.exit(main())
