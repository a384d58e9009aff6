"""Classify your own images with a trained Meta-SGD checkpoint, without Lightning's Trainer.

The support set is a folder with one subfolder of images per class, as many classes as the model's
ways (e.g. 5 for a 5-way checkpoint); a handful of images per class is enough:

    support/
        cat/  1.jpg  2.jpg
        dog/  1.jpg  2.jpg
        ...

Images are preprocessed as the checkpoint's data module preprocessed its test images. The model adapts
to the support set (Meta-SGD's inner steps), then predicts a class for each query image:

    python examples/adapt_to_your_images.py runs/omniglot_5way_1shot/checkpoints/last.ckpt support queries
"""

from __future__ import annotations

import argparse
import sys

from datamodules.images import ImageReadError
from metasgd_lightning.commands.inference import (
    adapt_to_folder,
    checkpoint_transform,
    load_meta_learner,
    predict_images,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by `metasgd fit`")
    parser.add_argument("support", help="folder with one subfolder of images per class")
    parser.add_argument("queries", nargs="+", help="image files, or folders of images, to classify")
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the checkpoint's)")
    args = parser.parse_args(argv)

    try:
        module = load_meta_learner(args.checkpoint)
        transform = checkpoint_transform(module)  # the test-time preprocessing of the training data
        model, class_names = adapt_to_folder(module, args.support, transform, steps=args.steps)
        predictions = predict_images(model, args.queries, transform, class_names)
    except (FileNotFoundError, ValueError, ImageReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # `model` is a plain torch.nn.Module: torch.save(model, "adapted.pt") keeps it for later use.
    print(f"Adapted to {len(class_names)} classes: {', '.join(class_names)}")
    for path, name, probability in predictions:
        print(f"{path}\t{name}\t{probability:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
