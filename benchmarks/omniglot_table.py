"""Meta-SGD against MAML on real Omniglot: 5-way 1-shot and 20-way 1-shot, on held-out characters.

Reads the official Omniglot "background small 1" split (5 alphabets, 136 characters) from the zip in
``../shared/data/omniglot/`` (unzipped into a temporary folder for the run, never into the repository),
splits its characters into train/validation/test with ``--fractions`` (training characters rotated by
90° as new classes), and trains both methods on the same task stream with the same budget:

* Meta-SGD: α learned, one per parameter, initialised uniformly in [0.005, 0.1];
* MAML: α fixed at 0.4 (MAML's rate for one inner step on Omniglot, Finn et al. 2017).

Both use the strided 4-block ConvNet with 64 channels, one inner step in training and testing, second
order, Adam with meta learning rate 1e-3. Each is then tested on the same fixed test tasks drawn from
the held-out characters, and the script prints accuracy ± 95% interval (1.96·std/√n over tasks).

    python benchmarks/omniglot_table.py                 # the default CPU budget (about 40 minutes on 2 otherwise idle cores)
    python benchmarks/omniglot_table.py --steps 50 20   # a smoke run

Writes the table and the command to docs/results.md and the records to
benchmarks/results/omniglot_table.json.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402
from datamodules import OmniglotDataModule  # noqa: E402
from metasgd_lightning import ConvNet4, MetaSGDLightningModule  # noqa: E402
from metasgd_lightning._quiet import silence_lightning_noise  # noqa: E402

SHARED_ZIP = REPO.parent / "shared/data/omniglot/images_background_small1.zip"
METHODS = {"Meta-SGD": dict(init_lr=(0.005, 0.1), learn_lr=True), "MAML": dict(init_lr=0.4, learn_lr=False)}
# Li et al. 2017, Table 2, on the full Omniglot (1200 training characters, 60,000 meta-iterations).
PUBLISHED = {("MAML", 5): "98.7 ± 0.4", ("Meta-SGD", 5): "99.53 ± 0.26",
             ("MAML", 20): "95.8 ± 0.3", ("Meta-SGD", 20): "95.93 ± 0.38"}


def run(method: str, root: Path, ways: int, steps: int, meta_batch: int, args) -> dict:
    L.seed_everything(args.seed, verbose=False)
    data = OmniglotDataModule(root=str(root), layout="folder", fractions=tuple(args.fractions), ways=ways, shots=1,
                              queries=1, meta_batch_size=meta_batch, train_tasks_per_epoch=steps * meta_batch,
                              val_tasks=meta_batch, test_tasks=args.test_tasks, seed=args.seed,
                              num_workers=args.num_workers)
    model = ConvNet4(out_features=ways, in_channels=1, hidden_channels=64, image_size=28, downsample="stride")
    module = MetaSGDLightningModule(model, task="classification", inner_steps=1, **METHODS[method])
    trainer_args = dict(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    L.Trainer(max_steps=steps, limit_val_batches=0, **trainer_args).fit(module, data)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = L.Trainer(**trainer_args).test(module, data, verbose=False)[0]
    record = dict(method=method, ways=ways, shots=1, acc=100 * metrics["test/acc"], ci95=100 * metrics["test/acc_ci95"],
                  steps=steps, meta_batch_size=meta_batch, train_seconds=round(train_seconds, 1),
                  test_seconds=round(time.perf_counter() - start, 1), test_tasks=args.test_tasks)
    print(f"{method:9s} {ways:2d}-way 1-shot  acc {record['acc']:.2f}% ± {record['ci95']:.2f}%  "
          f"({steps} steps × {meta_batch} tasks, {train_seconds:.0f} s training)", flush=True)
    return record


def table(records: list[dict]) -> str:
    lines = ["| method | ways | shots | test accuracy ± 95% CI (ours) | published, full Omniglot (Li et al. 2017) "
             "| meta-steps × tasks | training seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['method']} | {r['ways']} | {r['shots']} | {r['acc']:.2f}% ± {r['ci95']:.2f}% "
                     f"| {PUBLISHED.get((r['method'], r['ways']), '—')} | {r['steps']} × {r['meta_batch_size']} "
                     f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def section(records: list[dict], command: str, args) -> str:
    train, val, test = args.fractions
    return (
        "## Omniglot on real data: Meta-SGD against MAML\n\n"
        f"Command: `{command}` (CPU, {torch.get_num_threads()} threads). Data: the official \"background small 1\" "
        f"split from `../shared/data/omniglot/` (136 characters of 5 alphabets), characters split {train}/{val}/{test} "
        "(train/validation/test) with seed 0, training characters rotated by 90° as new classes; the test tasks use "
        f"only held-out characters. Both methods: the strided 64-channel ConvNet4, one inner step, second order, "
        f"Adam 1e-3, one query per class, the same task stream; Meta-SGD α ~ U[0.005, 0.1] learned, MAML α = 0.4 fixed. "
        f"Accuracy over the same {args.test_tasks} fixed test tasks, mean ± 1.96·std/√n. The published figures are for "
        "the full data set and 60,000 meta-iterations of 32 (5-way) or 16 (20-way) tasks: a far larger budget.\n\n"
        f"{table(records)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED_ZIP, help="images_background_small1.zip")
    parser.add_argument("--root", type=Path, help="an unzipped folder in the official layout (overrides --zip)")
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 1000],
                        help="meta-training steps, one per entry of --ways")
    parser.add_argument("--meta-batch-size", type=int, nargs="+", default=[8, 4], help="one per entry of --ways")
    parser.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.15, 0.25])
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["MAML", "Meta-SGD"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not len(args.ways) == len(args.steps) == len(args.meta_batch_size):
        parser.error(f"--steps and --meta-batch-size need one value per entry of --ways {args.ways}; "
                     f"got {args.steps} and {args.meta_batch_size}")
    silence_lightning_noise()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="omniglot_") as tmp:
        root = args.root
        if root is None:
            if not args.zip.is_file():
                parser.error(f"--zip: no file at {args.zip}; pass the Omniglot zip or --root with an unzipped folder")
            with zipfile.ZipFile(args.zip) as archive:
                archive.extractall(tmp)
            root = Path(tmp) / args.zip.stem
        command = "python benchmarks/omniglot_table.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        records = []
        for ways, steps, batch in zip(args.ways, args.steps, args.meta_batch_size):
            for method in args.methods:
                records.append(run(method, root, ways, steps, batch, args))
                # Written after every run, so that a stopped run keeps the rows it finished.
                write_results("omniglot_table", records, section(records, command.strip(), args))
    print("\n" + table(records))


if __name__ == "__main__":
    main()
