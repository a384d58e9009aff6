"""``metasgd plot-lrs`` reads checkpoints with PyTorch's safe ``weights_only`` loading, as inference does."""

import pytest
import torch

from conftest import run_in_process
from metasgd_lightning.commands.plotting import plot_learned_rates


class _Trap:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_plot_lrs_reads_checkpoints_with_weights_only_loading(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "trap.ckpt"
    torch.save({"state_dict": {"meta_learner.lrs.0-weight": torch.rand(4, 1)}, "hyper_parameters": _Trap(marker)},
               path)
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint.*trusted=True"):
        plot_learned_rates(path, tmp_path / "lrs.png")
    assert not marker.exists() and not (tmp_path / "lrs.png").exists()
    proc = run_in_process("plot-lrs", str(path), "--out", str(tmp_path / "lrs.png"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--trusted" in proc.stderr and not marker.exists()
    # A file you trust: the flag unpickles it.
    assert plot_learned_rates(path, tmp_path / "lrs.png", trusted=True).is_file() and marker.exists()
