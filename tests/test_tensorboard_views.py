"""TensorBoard shows the validation metric with its 95% band (custom scalars) and figures of adaptation."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from conftest import REPO, run_in_process
from metasgd_lightning.training.tensorboard_views import TensorBoardViews


def _fit(tmp_path, *extra):
    run_in_process("fit", "--config", str(REPO / "configs/sine_5shot.yaml"), "--data.meta_batch_size", "4",
                   "--data.val_tasks", "8", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
                   "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "run"), *extra,
                   cwd=tmp_path)
    events = EventAccumulator(str(tmp_path / "run" / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A run with the default views, read by the two tests of them: its folder and its events."""
    tmp_path = tmp_path_factory.mktemp("default_views")
    return tmp_path, _fit(tmp_path)


def test_the_validation_band_and_figures_are_logged(default_run):
    _, events = default_run
    mean, ci = events.Scalars("val/mse"), events.Scalars("val/mse_ci95")
    lower, upper = events.Scalars("val/mse_lower"), events.Scalars("val/mse_upper")
    assert [e.step for e in lower] == [e.step for e in upper] == [e.step for e in mean] and len(mean) == 2
    for m, c, lo, up in zip(mean, ci, lower, upper):
        assert lo.value == pytest.approx(m.value - c.value, rel=1e-5) and up.value == pytest.approx(m.value + c.value, rel=1e-5)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    band = charts["validation mse (band: 95% interval over tasks)"].margin.series[0]
    assert (band.value, band.lower, band.upper) == ("val/mse", "val/mse_lower", "val/mse_upper")
    assert list(charts["meta-training"].multiline.tag) == ["^train/(mse)$"]
    images = events.Images("adaptation/validation tasks")
    assert [i.step for i in images] == [e.step for e in mean]
    assert (images[0].width, images[0].height) == (1600, 300)  # 4 sine tasks


def test_the_scalars_page_opens_on_the_curves_and_hparams_keep_hp_metric(default_run):
    tmp_path, events = default_run
    scalars = events.Tags()["scalars"]
    assert "epoch" not in scalars and sorted(scalars)[0] == "hp_metric"  # then lr/, train/, val/
    assert [e.step for e in events.Scalars("hp_metric")] == [e.step for e in events.Scalars("val/mse")]  # no -1 at 0
    tags = set()
    for path in (tmp_path / "run" / "lightning_logs" / "version_0").glob("events.out.tfevents.*"):
        tags |= {value.tag for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    assert "_hparams_/experiment" in tags  # the HParams view is still written


def test_figures_can_be_switched_off(tmp_path):
    events = _fit(tmp_path, "--tensorboard.figures_every_n_validations", "0", "--tensorboard.band", "false")
    assert not events.Tags()["images"] and "val/mse_lower" not in events.Tags()["scalars"]
    assert "custom_scalars__config__" not in events.Tags()["tensors"]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="figures_every_n_validations"):
        TensorBoardViews(figures_every_n_validations=-1)
    with pytest.raises(ValueError, match="figure_tasks"):
        TensorBoardViews(figure_tasks=0)
