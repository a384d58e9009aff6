"""Omniglot's one-shot challenge (Lake et al. 2015) on a fixture in the official all_runs layout."""

import re

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_in_process
from datamodules.lake_oneshot import OmniglotOneShotDataModule
from metasgd_lightning import ConvNet4, MetaSGDLightningModule


def _write_runs(root, runs=2, ways=20, seed=0):
    """Runs in the official layout; test item k belongs to class (7k mod 20) + 1, listed in shuffled order."""
    rng = np.random.default_rng(seed)
    for r in range(1, runs + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        lines = []
        for c in range(1, ways + 1):
            strokes = rng.random((105, 105)) > 0.1  # 1-bit, mostly white like the real drawings
            Image.fromarray(strokes).save(run / "training" / f"class{c:02d}.png")
            Image.fromarray(strokes).save(run / "test" / f"item{c:02d}.png")  # item c is a copy of class (c)
        for c in rng.permutation(ways) + 1:
            lines.append(f"run{r:02d}/test/item{c:02d}.png run{r:02d}/training/class{c:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def test_runs_are_read_in_the_official_layout(tmp_path):
    dm = OmniglotOneShotDataModule(root=str(_write_runs(tmp_path)))
    dm.setup("test")
    assert dm.task_names == ["run01", "run02"]
    sx, sy, qx, qy = next(iter(dm.test_dataloader()))
    assert sx.shape == (1, 20, 1, 28, 28) and qx.shape == (1, 20, 1, 28, 28)
    assert sy.tolist() == [list(range(20))]
    # Test item c is a copy of training class c, so the labels must pair identical images.
    for q, label in zip(qx[0], qy[0]):
        assert torch.equal(q, sx[0, label])
    assert 0 <= float(sx.min()) and float(sx.max()) <= 1 and sx.mean() < 0.5  # inverted: strokes are 1


def test_layout_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="runNN/training/classNN.png"):
        OmniglotOneShotDataModule(root=str(tmp_path / "absent")).setup("test")
    _write_runs(tmp_path, runs=1)
    (tmp_path / "run01" / "class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="class_labels.txt is missing"):
        OmniglotOneShotDataModule(root=str(tmp_path)).setup("test")


def test_metasgd_test_prints_per_run_errors_and_the_mean(tmp_path):
    root = _write_runs(tmp_path / "all_runs")
    module = MetaSGDLightningModule(ConvNet4(out_features=20, hidden_channels=8), task="classification",
                                    init_lr=0.1, eval_inner_steps=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "20way.ckpt")
    proc = run_in_process("test", "--config", str(REPO / "configs/omniglot_lake_oneshot.yaml"), "--data.root",
                          str(root), "--trainer.default_root_dir", str(tmp_path / "runs"), "--checkpoint.dirpath",
                          str(tmp_path / "ck"), "--ckpt_path", str(tmp_path / "20way.ckpt"), cwd=tmp_path)
    printed = dict(re.findall(r"(run\d\d): error ([\d.]+)%", proc.stdout))
    assert sorted(printed) == ["run01", "run02"]
    # The same errors computed here, run by run.
    dm = OmniglotOneShotDataModule(root=str(root))
    dm.setup("test")
    for name, batch in zip(dm.task_names, dm.test_dataloader()):
        result = module.adapt_batch(batch, "test", steps=2, first_order=True)
        accuracy = (result.query_output.argmax(-1) == batch[3]).float().mean()
        assert float(printed[name]) == pytest.approx(100 * (1 - float(accuracy)), abs=0.051)
    mean = float(re.search(r"Mean error over 2 runs: ([\d.]+)%", proc.stdout).group(1))
    assert mean == pytest.approx(sum(map(float, printed.values())) / 2, abs=0.051)
    assert "humans 4.5%" in proc.stdout
