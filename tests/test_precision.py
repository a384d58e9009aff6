"""Lightning precision settings on CPU: ``bf16-mixed`` and ``16-mixed`` train (the float16 inner loop
without underflow), ``64-true`` gives exact meta-gradients."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules import SineDataModule
from metasgd_lightning import ConvNet4, MetaSGD, MetaSGDLightningModule, SineMLP

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def _trainer(tmp_path, callbacks=(), **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks), **kwargs)


class ImageTasks(Dataset):
    """Random 5-way 1-shot tasks of 28x28 grey images (the Omniglot shapes), 3 queries per class."""

    def __init__(self, length: int, ways: int = 5, shots: int = 1, queries: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.sx = torch.randn(length, ways * shots, 1, 28, 28, generator=g)
        self.qx = torch.randn(length, ways * queries, 1, 28, 28, generator=g)
        self.sy = torch.arange(ways).repeat_interleave(shots)
        self.qy = torch.arange(ways).repeat_interleave(queries)

    def __len__(self) -> int:
        return len(self.sx)

    def __getitem__(self, i):
        return self.sx[i], self.sy, self.qx[i], self.qy


class Capture(L.Callback):
    """Keeps each training batch, the meta-loss, and the meta-gradient of θ and α before the optimiser step."""

    def __init__(self) -> None:
        self.batches, self.losses, self.grads = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.meta_learner.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.mark.parametrize("case", ["sine", "convnet"])
def test_bf16_mixed_trains_with_finite_loss(tmp_path, case):
    capture = Capture()
    if case == "sine":
        module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1))
        data = dict(datamodule=SineDataModule(meta_batch_size=4, train_tasks_per_epoch=40, val_tasks=4))
    else:
        module = MetaSGDLightningModule(ConvNet4(out_features=5, hidden_channels=16), task="classification",
                                        init_lr=0.01)
        data = dict(train_dataloaders=DataLoader(ImageTasks(8), batch_size=2))
    before = {n: p.detach().clone() for n, p in module.meta_learner.named_parameters()}
    dtypes = set()
    first_layer = next(m for m in module.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    first_layer.register_forward_hook(lambda m, args, output: dtypes.add(output.dtype))
    trainer = _trainer(tmp_path, [capture], precision="bf16-mixed", max_steps=3)
    trainer.fit(module, **data)
    assert dtypes == {torch.bfloat16}  # autocast reached the inner loop's functional calls
    assert trainer.global_step == 3
    assert len(capture.losses) == 3 and all(math.isfinite(v) for v in capture.losses), capture.losses
    after = dict(module.meta_learner.named_parameters())
    # the master weights stay float32 and were updated by finite meta-gradients
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    assert all(torch.isfinite(g).all() for grads in capture.grads for g in grads.values())
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("lrs."))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("model."))


def _reference_meta_gradient(weights: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
    """Meta-SGD's meta-gradient for the 1-40-40-1 MLP, written out by hand in float64."""
    names = [f"model.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")]
    theta = [weights[n].detach().double().requires_grad_() for n in names]
    alpha = [weights["lrs." + n.removeprefix("model.").replace(".", "-")].detach().double().requires_grad_()
             for n in names]

    def mlp(x, w):
        h = torch.relu(x @ w[0].T + w[1])
        h = torch.relu(h @ w[2].T + w[3])
        return h @ w[4].T + w[5]

    losses = []
    for sx, sy, qx, qy in zip(*(t.double() for t in batch)):
        support = ((mlp(sx, theta) - sy) ** 2).mean()
        grads = torch.autograd.grad(support, theta, create_graph=True)
        fast = [w - a * g for w, a, g in zip(theta, alpha, grads)]
        losses.append(((mlp(qx, fast) - qy) ** 2).mean())
    meta = torch.stack(losses).mean()
    grads = torch.autograd.grad(meta, theta + alpha)
    keys = names + ["lrs." + n.removeprefix("model.").replace(".", "-") for n in names]
    return dict(zip(keys, grads))


def _fit_sine(tmp_path, max_steps: int, on_module=None, **precision):
    """Meta-train Meta-SGD on sine tasks; (module, its weights before, the Capture, the trainer)."""
    capture = Capture()
    module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1))
    if on_module is not None:
        on_module(module)
    start = {n: p.detach().clone() for n, p in module.meta_learner.named_parameters()}
    trainer = _trainer(tmp_path, [capture], max_steps=max_steps, **precision)
    trainer.fit(module, datamodule=SineDataModule(meta_batch_size=4, train_tasks_per_epoch=40, val_tasks=4))
    return module, start, capture, trainer


def test_64_true_meta_gradient_matches_a_hand_written_double_computation(tmp_path):
    module, start, capture, trainer = _fit_sine(tmp_path, max_steps=1, precision="64-true")
    (batch,), (grads,) = capture.batches, capture.grads
    assert all(t.dtype == torch.float64 for t in batch)  # Lightning converted the float32 batch
    assert all(g.dtype == torch.float64 for g in grads.values())
    expected = _reference_meta_gradient(start, batch)
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert any(expected[n].abs().max() > 1e-3 for n in expected if n.startswith("lrs."))  # α gets a real gradient


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_float16_autocast_does_not_flush_the_inner_gradient_to_zero(vectorize):
    # A loss this small has gradients below float16's range: taken in float16 they are all zero, and the
    # inner step would silently not move. The inner loop takes them in float32 (and α is large enough
    # here that the step shows in float32 weights).
    torch.manual_seed(0)
    meta = MetaSGD(SineMLP(), init_lr=1e7)
    tiny = lambda output, target: 1e-9 * ((output - target) ** 2).mean()  # noqa: E731
    sx, sy, qx, qy = torch.randn(2, 10, 1), torch.randn(2, 10, 1), torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    with torch.autocast("cpu", dtype=torch.float16):
        naive = torch.autograd.grad(tiny(meta(sx[0]), sy[0]), list(meta.model.parameters()))
        half = meta.adapt_tasks(sx, sy, qx, qy, tiny, steps=1, vectorize=vectorize, first_order=True)
    assert all((g == 0).all() for g in naive)  # what plain float16 gives
    full = meta.adapt_tasks(sx, sy, qx, qy, tiny, steps=1, vectorize=vectorize, first_order=True)
    if vectorize == "loop":  # the query pass still runs under autocast (torch.func's vmap runs it in float32 on CPU)
        assert half.query_output.dtype == torch.float16
    unadapted = torch.stack([meta(x) for x in qx]).detach()
    assert (full.query_output - unadapted).abs().max() > 0.01  # the inner step moved the predictions
    torch.testing.assert_close(half.query_output.float(), full.query_output, rtol=2e-3, atol=2e-3)


def test_16_mixed_with_a_loss_scaler_trains_with_a_float32_inner_loop(tmp_path):
    # precision="16-mixed" on CPU falls back to bf16 in Lightning; the plugin itself gives float16 autocast
    # and a GradScaler on CPU too, as on a GPU.
    from lightning.pytorch.plugins.precision import MixedPrecision

    dtypes = set()
    module, before, capture, trainer = _fit_sine(
        tmp_path, max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu")],
        on_module=lambda m: m.model[0].register_forward_hook(lambda layer, args, out: dtypes.add(out.dtype)))
    assert trainer.precision_plugin.scaler is not None
    assert dtypes == {torch.float16, torch.float32}  # the query pass in float16, the support pass in float32
    assert trainer.global_step == 3 and all(math.isfinite(v) for v in capture.losses), capture.losses
    after = dict(module.meta_learner.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("lrs."))
