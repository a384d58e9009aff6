"""``metasgd adapt CKPT --support DIR --queries DIR [--output predictions.csv]``: classify your own images.

The support set is a folder with one subfolder of images per class, as many classes as the model's ways;
the model adapts to it (the inner steps of its method: Meta-SGD, MAML or Reptile) and predicts a class for each query image, printed as a
table and, with ``--output``, written as CSV or JSON (by the file's suffix). It is
:func:`~metasgd_lightning.commands.inference.adapt_to_folder` and :func:`~metasgd_lightning.commands.inference.predict_images`
on the command line, with their errors.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from datamodules.images import ImageReadError

from ._parser import OneLineArgumentParser
from .inference import Prediction, adapt_to_folder, checkpoint_transform, load_meta_learner, predict_images

__all__ = ["main", "write_predictions"]


def write_predictions(predictions: list[Prediction], out: str | Path) -> Path:
    """Write ``(path, class_name, probability)`` rows as CSV (``.csv``) or JSON (``.json``, a list of objects)."""
    out = Path(out)
    rows = [{"path": str(p.path), "class_name": p.class_name, "probability": p.probability} for p in predictions]
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output must end in .csv or .json; got {out.name}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(out, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["path", "class_name", "probability"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def main(argv: list[str]) -> int:
    parser = OneLineArgumentParser(prog="metasgd adapt", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="a .ckpt file of an image classification config, written by `metasgd fit`")
    parser.add_argument("--support", required=True, help="folder with one subfolder of images per class")
    parser.add_argument("--queries", required=True, nargs="+", help="image files, or folders of images, to classify")
    parser.add_argument("--output", default=None, help="also write the predictions to this .csv or .json file")
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        if args.output is not None and Path(args.output).suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--output must end in .csv or .json; got {Path(args.output).name}.")
        module = load_meta_learner(args.checkpoint)
        transform = checkpoint_transform(module)  # the test-time preprocessing of the training data
        model, class_names = adapt_to_folder(module, args.support, transform, steps=args.steps)
        predictions = predict_images(model, args.queries, transform, class_names)
    except (FileNotFoundError, ValueError, ImageReadError) as error:
        print(f"metasgd adapt: {error}", file=sys.stderr)
        return 1
    print(f"Adapted to {len(class_names)} classes: {', '.join(class_names)}")
    width = max(len(str(p.path)) for p in predictions)
    print(f"{'image':<{width}}  {'class':<12}  probability")
    for path, name, probability in predictions:
        print(f"{str(path):<{width}}  {name:<12}  {probability:.2f}")
    if args.output is not None:
        print(f"Wrote {write_predictions(predictions, args.output)}")
    return 0
