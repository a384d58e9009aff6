"""Data errors that name the real problem: a data folder that does not exist is named before any download fails."""

from pathlib import Path

import pytest

from datamodules import OmniglotDataModule
from datamodules.episodic import DownloadError

SMALL = dict(ways=3, shots=1, queries=1, meta_batch_size=2, val_tasks=4, test_tasks=4, image_size=8, num_workers=0)


def test_a_missing_omniglot_root_is_named_and_left_missing_after_a_failed_download(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.omniglot as tv_omniglot

    def offline(url, download_root, filename=None, md5=None, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_omniglot, "download_and_extract_archive", offline)
    root = tmp_path / "dta" / "omniglot"  # a typo of data/omniglot
    with pytest.raises(DownloadError, match=rf"network unreachable.*The data folder {root} did not exist"):
        OmniglotDataModule(root=str(root), download=True, **SMALL).prepare_data()
    assert f"the data folder {root} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "dta").exists()  # no empty folders left behind


def test_an_existing_root_is_not_removed_by_a_failed_download(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.omniglot as tv_omniglot

    def offline(url, download_root, filename=None, md5=None, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_omniglot, "download_and_extract_archive", offline)
    with pytest.raises(DownloadError) as error:
        OmniglotDataModule(root=str(tmp_path), download=True, **SMALL).prepare_data()
    assert "did not exist" not in str(error.value) and "does not exist" not in capsys.readouterr().err
    assert tmp_path.is_dir() and not (tmp_path / "omniglot-py").exists()
