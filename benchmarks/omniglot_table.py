"""Meta-SGD against MAML on real Omniglot: held-out characters, and alphabets never seen in training.

Reads the official Omniglot "background small 1" split (5 alphabets, 136 characters) from the zip in
``../shared/data/omniglot/`` (unzipped into a temporary folder for the run, never into the repository).
Two protocols (``--protocol``):

* ``characters``: the characters of all 5 alphabets split into train/validation/test (``--fractions``);
  5-way 1-shot and 20-way 1-shot test tasks of held-out characters. Meta-SGD runs in several variants
  (``VARIANTS``) beside MAML, every row on the same task stream and budget; each row is also scored
  on the validation tasks, the only score that may choose a variant.
* ``alphabets``: leave one alphabet out, each in turn (5 folds): the test tasks use only the held-out
  alphabet, validation the next alphabet, training the other three. 5-way 1-shot tasks, and 20-way
  1-shot tasks whose 20 characters all come from one alphabet (``within_alphabet``: the protocol of
  Lake et al.'s one-shot challenge, scored as an error rate). Reported per fold and pooled over the
  5 folds' test tasks.

Every row: the strided 64-channel ConvNet4, second order, Adam 1e-3, one query per class, training
characters rotated by 90° as new classes; MAML is the published algorithm (fixed α = 0.4, plain steps).
Each row is tested on the same fixed test tasks at its own number of inner steps and at 10, and the
script prints accuracy ± 95% interval (1.96·std/√n over tasks).

    python -m benchmarks.omniglot_table --jobs 2                         # characters, all variants
    python -m benchmarks.omniglot_table --protocol alphabets --jobs 2    # leave-one-alphabet-out
    python -m benchmarks.omniglot_table --steps 30 10 --no-write          # a smoke run

Writes each protocol's table and command to docs/results.md and the records to
benchmarks/results/omniglot_{characters,alphabets}.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path

import lightning as L
import torch

from benchmarks._results import write_results
from benchmarks._training import fit_and_test, quiet, run_rows
from datamodules import OmniglotDataModule
from metasgd_lightning import ConvNet4, MetaSGDLightningModule

REPO = Path(__file__).resolve().parents[1]

SHARED_ZIP = REPO.parent / "shared/data/omniglot/images_background_small1.zip"
ALPHABETS = ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
EVAL_STEPS = 10
MAML = dict(init_lr=0.4, learn_lr=False, line_search="off")
# Meta-SGD variants: (inner steps, module arguments). "paper" is Li et al.'s setting.
VARIANTS = {
    "paper: α₀ ~ U[0.005, 0.1]": (1, dict(init_lr=(0.005, 0.1))),
    "α₀ = 0.4 (MAML's rate)": (1, dict(init_lr=0.4)),
    "α₀ ~ U[0.005, 0.1], α meta-lr 5e-3": (1, dict(init_lr=(0.005, 0.1), lr_meta_lr=5e-3)),
    "α₀ = 0.4, 3 steps": (3, dict(init_lr=0.4)),
    "α₀ = 0.4, 3 steps, per-step α": (3, dict(init_lr=0.4, per_step_lr=True)),
}
# The variant the characters protocol's validation accuracy chose at each way count (2000 × 8 and
# 1000 × 4 meta-steps × tasks, seed 0; docs/results.md): what the shipped configs use, and the only
# Meta-SGD variant of the alphabets protocol unless --variants names others.
SELECTED = {5: "α₀ ~ U[0.005, 0.1], α meta-lr 5e-3", 20: "α₀ = 0.4, 3 steps"}
# Li et al. 2017, Table 2, on the full Omniglot (1200 training characters, 60,000 meta-iterations).
PUBLISHED = {("MAML", 5): "98.7 ± 0.4", ("Meta-SGD", 5): "99.53 ± 0.26",
             ("MAML", 20): "95.8 ± 0.3", ("Meta-SGD", 20): "95.93 ± 0.38"}


def run(row: dict) -> dict:
    """Train, validate and test one row (in a worker process)."""
    quiet()
    L.seed_everything(row["seed"], verbose=False)
    ways = row["ways"]
    split = dict(fractions=tuple(row["fractions"])) if row["protocol"] == "characters" else dict(
        split_by="alphabet", val_alphabets=[row["val_alphabet"]], test_alphabets=[row["test_alphabet"]],
        within_alphabet=row["within_alphabet"])
    data = OmniglotDataModule(root=row["root"], layout="folder", ways=ways, shots=1, queries=1,
                              meta_batch_size=row["meta_batch"], train_tasks_per_epoch=row["steps"] * row["meta_batch"],
                              val_tasks=row["val_tasks"], test_tasks=row["test_tasks"], seed=row["seed"],
                              num_workers=row["num_workers"], **split)
    model = ConvNet4(out_features=ways, in_channels=1, hidden_channels=64, image_size=28, downsample="stride")
    module = MetaSGDLightningModule(model, task="classification", inner_steps=row["inner_steps"], **row["extra"])
    result = fit_and_test(module, data, row["steps"], sorted({row["inner_steps"], EVAL_STEPS}), validate=True)
    record = {k: v for k, v in row.items() if k not in ("root", "extra", "label")}
    record.update(seconds=result["seconds"], steps_done=result["steps_done"], evaluations=[])
    if "diverged" in result:
        record["diverged"] = result["diverged"]
    if "val" in result:
        record["val_acc"] = None if "diverged" in result["val"] else 100 * result["val"]["mean"]
    for eval_steps, scores in result.get("eval", {}).items():
        entry = dict(eval_inner_steps=eval_steps)
        if "diverged" in scores:
            entry["diverged"] = scores["diverged"]
        else:
            entry.update(acc=100 * scores["mean"], ci95=100 * scores["ci95"], values=scores["values"])
        record["evaluations"].append(entry)
    record["summary"] = f"{row['label']}: " + (record.get("diverged") or f"val {record.get('val_acc') or 0:.1f}%; " + "; ".join(
        f"{e['eval_inner_steps']} steps at test " + (e.get("diverged") or f"{e['acc']:.2f}% ± {e['ci95']:.2f}%")
        for e in record["evaluations"]))
    return record


def rows(args, root: Path) -> list[dict]:
    common = dict(root=str(root), seed=args.seed, num_workers=args.num_workers, test_tasks=args.test_tasks,
                  val_tasks=args.val_tasks, fractions=args.fractions)
    def methods(ways: int) -> list[tuple]:
        default = VARIANTS if args.protocol == "characters" else [SELECTED[ways]]
        return [("MAML", "published (α = 0.4 fixed)", 1, MAML)] + [
            ("Meta-SGD", name, *VARIANTS[name]) for name in (args.variants or default)]

    table = []
    if args.protocol == "characters":
        for ways, steps, batch in zip(args.ways, args.steps, args.meta_batch_size):
            for method, variant, inner, extra in methods(ways):
                table.append(dict(common, protocol="characters", ways=ways, steps=steps, meta_batch=batch,
                                  method=method, variant=variant, inner_steps=inner, extra=extra,
                                  label=f"{ways}-way {method} {variant}"))
    else:
        for ways, steps, batch in zip(args.ways, args.steps, args.meta_batch_size):
            for fold, test_alphabet in enumerate(ALPHABETS):
                if args.folds and fold not in args.folds:
                    continue
                val_alphabet = ALPHABETS[(fold + 1) % len(ALPHABETS)]
                for method, variant, inner, extra in methods(ways):
                    table.append(dict(common, protocol="alphabets", ways=ways, steps=steps, meta_batch=batch,
                                      method=method, variant=variant, inner_steps=inner, extra=extra, fold=fold,
                                      test_alphabet=test_alphabet, val_alphabet=val_alphabet,
                                      within_alphabet=ways >= 20,
                                      label=f"{ways}-way {method} {variant}, test alphabet {test_alphabet}"))
    return table


def _score(entry: dict, error: bool = False) -> str:
    if "diverged" in entry:
        where = entry["diverged"].split(":")[0]
        return f"diverged in {where}" if where.startswith("training") else "diverged at test"
    if error:
        return f"{100 - entry['acc']:.1f}% ± {entry['ci95']:.1f}%"
    return f"{entry['acc']:.2f}% ± {entry['ci95']:.2f}%"


def characters_table(records: list[dict]) -> str:
    lines = ["| ways | method | variant | inner steps (train) | inner steps (test) | validation accuracy "
             "| test accuracy ± 95% CI | published, full Omniglot (Li et al. 2017) | meta-steps × tasks | training seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        val = f"{r['val_acc']:.1f}%" if r.get("val_acc") is not None else "—"
        for e in r["evaluations"] or [{"diverged": r.get("diverged", "—")}]:
            own = e.get("eval_inner_steps") == r["inner_steps"]
            published = PUBLISHED.get((r["method"], r["ways"]), "—") if own and r["variant"].startswith(("paper", "published")) else "—"
            lines.append(f"| {r['ways']} | {r['method']} | {r['variant']} | {r['inner_steps']} | {e.get('eval_inner_steps', '—')} "
                         f"| {val if own else ''} | {_score(e)} | {published} | {r['steps']} × {r['meta_batch']} "
                         f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def pooled(records: list[dict], eval_steps: int) -> dict | None:
    """Mean accuracy and 95% interval over the test tasks of every fold (one value per task)."""
    values = [v for r in records for e in r["evaluations"] if e["eval_inner_steps"] == eval_steps for v in e.get("values", [])]
    if not values or any("diverged" in e for r in records for e in r["evaluations"] if e["eval_inner_steps"] == eval_steps):
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return dict(acc=100 * float(t.mean()), ci95=100 * float(1.96 * t.std() / len(t) ** 0.5), n=len(t))


def alphabets_table(records: list[dict]) -> str:
    lines = ["| ways | tasks | method | variant | test alphabet | inner steps (train / test) | test accuracy ± 95% CI "
             "| test error ± 95% CI | meta-steps × tasks | training seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["ways"], r["method"], r["variant"]), []).append(r)
    for (ways, method, variant), group in groups.items():
        kind = "within one alphabet" if group[0]["within_alphabet"] else "any characters"
        for r in group:
            for e in r["evaluations"]:
                lines.append(f"| {ways} | {kind} | {method} | {variant} | {r['test_alphabet']} | {r['inner_steps']} / "
                             f"{e['eval_inner_steps']} | {_score(e)} | {_score(e, error=True)} | {r['steps']} × {r['meta_batch']} "
                             f"| {r['seconds']:.0f} |")
        for steps in sorted({e["eval_inner_steps"] for r in group for e in r["evaluations"]}):
            p = pooled(group, steps)
            if p is not None:
                lines.append(f"| {ways} | {kind} | {method} | {variant} | **all {len(group)} folds** ({p['n']} tasks) "
                             f"| {group[0]['inner_steps']} / {steps} | **{p['acc']:.2f}% ± {p['ci95']:.2f}%** "
                             f"| **{100 - p['acc']:.1f}% ± {p['ci95']:.1f}%** | | |")
    return "\n".join(lines)


def section(records: list[dict], command: str, args, threads: str) -> str:
    if args.protocol == "characters":
        train, val, test = args.fractions
        return (
            "## Omniglot on real data, held-out characters: Meta-SGD variants against MAML\n\n"
            f"Command: `{command}` (CPU, {threads}). Data: the official \"background small 1\" split from "
            f"`../shared/data/omniglot/` (136 characters of 5 alphabets), characters split {train}/{val}/{test} "
            f"(train/validation/test) with seed 0. Seed {args.seed} for every row. Every row: strided 64-channel ConvNet4, "
            "second order, Adam 1e-3, one query per class, the same task stream and budget; MAML α = 0.4 fixed with "
            "plain steps (the published algorithm); Meta-SGD with the default `line_search` (backtracking for "
            f"several steps). Validation accuracy on {args.val_tasks} tasks of the validation characters at the row's "
            f"own steps (what chooses a variant); test accuracy on the same {args.test_tasks} fixed tasks of held-out "
            f"characters at the row's own steps and at {EVAL_STEPS}, mean ± 1.96·std/√n. The published figures are for "
            "the full data set and 60,000 meta-iterations: a far larger budget.\n\n"
            f"{characters_table(records)}\n"
        )
    return (
        "## Omniglot on real data, alphabets never seen in training\n\n"
        f"Command: `{command}` (CPU, {threads}). Data: the official \"background small 1\" split (5 alphabets). "
        "Leave one alphabet out: fold i tests on alphabet i, validates on the next alphabet and trains on the other "
        "three (all their characters, rotated by 90° as new classes). 5-way tasks draw any characters of the "
        "split; 20-way tasks draw all 20 characters from one alphabet (`within_alphabet=True`, Lake et al.'s "
        f"one-shot challenge protocol; the error rate is that challenge's figure). {args.test_tasks} test tasks per fold, "
        "pooled rows over all folds' tasks. Seed {seed} for every row; same budget and task stream for both methods; "
        "MAML α = 0.4 fixed with plain steps; Meta-SGD in the variant that the held-out-characters protocol's "
        "validation accuracy chose at each way count (`SELECTED`, the shipped configs' settings), never chosen "
        "on these test alphabets.\n\n".replace("{seed}", str(args.seed))
        + f"{alphabets_table(records)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["characters", "alphabets"], default="characters")
    parser.add_argument("--zip", type=Path, default=SHARED_ZIP, help="images_background_small1.zip")
    parser.add_argument("--root", type=Path, help="an unzipped folder in the official layout (overrides --zip)")
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--steps", type=int, nargs="+", help="meta-training steps, one per entry of --ways "
                        "(default: 2000 1000 for characters, 1000 1000 for alphabets)")
    parser.add_argument("--meta-batch-size", type=int, nargs="+", default=[8, 4], help="one per entry of --ways")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="Meta-SGD variants (default: all for characters, "
                        "SELECTED at each way count for alphabets)")
    parser.add_argument("--folds", type=int, nargs="+", help="alphabets protocol: only these folds (0-4)")
    parser.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.15, 0.25])
    parser.add_argument("--val-tasks", type=int, default=200)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once, in separate processes")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = [2000, 1000] if args.protocol == "characters" else [1000, 500]
    if not len(args.ways) == len(args.steps) == len(args.meta_batch_size):
        parser.error(f"--steps and --meta-batch-size need one value per entry of --ways {args.ways}; "
                     f"got {args.steps} and {args.meta_batch_size}")
    quiet()
    with tempfile.TemporaryDirectory(prefix="omniglot_") as tmp:
        root = args.root
        if root is None:
            if not args.zip.is_file():
                parser.error(f"--zip: no file at {args.zip}; pass the Omniglot zip or --root with an unzipped folder")
            with zipfile.ZipFile(args.zip) as archive:
                archive.extractall(tmp)
            root = Path(tmp) / args.zip.stem
        command = "python -m benchmarks.omniglot_table " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        threads = f"{args.jobs} processes of {max(1, torch.get_num_threads() // args.jobs)} thread(s)" \
            if args.jobs > 1 else f"{torch.get_num_threads()} threads"

        def write(records: list[dict]) -> None:  # after every row: a stopped run keeps the rows it finished
            if records and not args.no_write:
                write_results(f"omniglot_{args.protocol}", [_stored(r) for r in records],
                              section(records, command.strip(), args, threads))

        records = [r for r in run_rows(rows(args, root), run, args.jobs, on_record=write) if "error" not in r]
    print("\n" + section(records, command.strip(), args, threads))


def _stored(record: dict) -> dict:
    """A record for the JSON file: per-task values only where pooling over folds needs them."""
    record = {k: v for k, v in record.items() if k != "summary"}
    if record["protocol"] == "characters":
        record["evaluations"] = [{k: v for k, v in e.items() if k != "values"} for e in record["evaluations"]]
    return record


if __name__ == "__main__":
    main()
