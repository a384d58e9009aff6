"""The Meta-SGD maths: agreement with learn2learn, purity, first order, frozen parameters, bad input."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.learn2learn_import import import_learn2learn
from metasgd_lightning import InnerLoopDivergedError, MetaSGD
from metasgd_lightning.methods.contract import check_task_batch
from metasgd_lightning.methods.models import ConvNet4, SineMLP

l2l = import_learn2learn()


def _regression_task(tasks=None, shots=5, queries=7, dtype=torch.float64):
    shape = () if tasks is None else (tasks,)
    sx, qx = torch.randn(*shape, shots, 1, dtype=dtype), torch.randn(*shape, queries, 1, dtype=dtype)
    return sx, torch.sin(sx) * 2, qx, torch.sin(qx) * 2


def _image_task(tasks=None, ways=3, shots=2, queries=2, size=16, dtype=torch.float64):
    shape = () if tasks is None else (tasks,)
    sx = torch.randn(*shape, ways * shots, 1, size, size, dtype=dtype)
    qx = torch.randn(*shape, ways * queries, 1, size, size, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).expand(*shape, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(*shape, -1).clone()
    return sx, sy, qx, qy


CASES = {
    "sine-mlp": (lambda: SineMLP(), _regression_task, F.mse_loss),
    "convnet-bn": (lambda: ConvNet4(out_features=3, hidden_channels=4, image_size=16), _image_task, F.cross_entropy),
}


def _ours_vs_l2l(case, steps, first_order):
    make_model, make_task, loss_fn = CASES[case]
    model = make_model().double()
    ours = MetaSGD(copy.deepcopy(model), init_lr=(0.01, 0.3), inner_steps=steps, first_order=first_order,
                   line_search="off")  # learn2learn takes the plain step
    theirs = l2l.algorithms.MetaSGD(copy.deepcopy(model), lr=1.0, first_order=first_order)
    for lr, name in zip(theirs.lrs, ours.adapted_names):  # the same random α in both
        lr.data.copy_(ours.lr(name).data)
    sx, sy, qx, qy = make_task()

    fast = ours.adapt(sx, sy, loss_fn)
    loss_fn(ours(qx, fast), qy).backward()

    learner = theirs.clone()
    for _ in range(steps):
        learner.adapt(loss_fn(learner(sx), sy))
    loss_fn(learner(qx), qy).backward()
    return ours, theirs, fast, learner


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_matches_learn2learn_metasgd(case, steps, first_order):
    ours, theirs, fast, learner = _ours_vs_l2l(case, steps, first_order)
    names = ours.adapted_names
    for name, adapted in zip(names, learner.module.parameters()):
        torch.testing.assert_close(fast[name], adapted, rtol=1e-6, atol=1e-9, msg=f"adapted {name}")
    for name, p_theirs, lr_theirs in zip(names, theirs.module.parameters(), theirs.lrs):
        p_ours = dict(ours.model.named_parameters())[name]
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-6, atol=1e-9, msg=f"meta-gradient of θ {name}")
        torch.testing.assert_close(ours.lr(name).grad, lr_theirs.grad, rtol=1e-6, atol=1e-9, msg=f"meta-gradient of α {name}")


def test_second_order_differs_from_first_order():
    # Guards the comparison above: if both orders gave the same θ-gradient, the test could not tell them apart.
    grads = {}
    for first_order in (False, True):
        torch.manual_seed(0)
        ours, *_ = _ours_vs_l2l("sine-mlp", 1, first_order)
        grads[first_order] = ours.model[0].weight.grad.clone()
    assert not torch.allclose(grads[False], grads[True])


def test_adapt_does_not_touch_theta():
    meta = MetaSGD(SineMLP(), init_lr=0.5, inner_steps=3)
    before = {k: v.clone() for k, v in meta.state_dict().items()}
    sx, sy, qx, qy = _regression_task(dtype=torch.float32)
    fast = meta.adapt(sx, sy, F.mse_loss)
    for name, param in meta.model.named_parameters():
        assert fast[name] is not param and not torch.equal(fast[name], param), name
    for key, value in meta.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in place"


def test_first_order_still_trains_alpha_and_drops_hessian_terms():
    meta = MetaSGD(SineMLP().double(), init_lr=0.1, first_order=True, inner_steps=2)
    sx, sy, qx, qy = _regression_task()
    fast = meta.adapt(sx, sy, F.mse_loss)
    for name in meta.adapted_names:
        assert fast[name].grad_fn is not None  # still a function of θ and α
    F.mse_loss(meta(qx, fast), qy).backward()
    assert all(meta.lr(n).grad is not None and meta.lr(n).grad.abs().sum() > 0 for n in meta.adapted_names)


def test_frozen_parameters_are_used_but_not_adapted():
    model = SineMLP()
    model[0].requires_grad_(False)
    meta = MetaSGD(model, init_lr=0.1)
    assert set(meta.lrs.keys()) == {"2-weight", "2-bias", "4-weight", "4-bias"}
    sx, sy, qx, qy = _regression_task(dtype=torch.float32)
    fast = meta.adapt(sx, sy, F.mse_loss)
    assert fast["0.weight"] is model[0].weight
    assert not torch.equal(fast["2.weight"], model[2].weight)
    F.mse_loss(meta(qx, fast), qy).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None


def test_init_lr_forms():
    uniform = MetaSGD(SineMLP(), init_lr=(0.005, 0.1))
    alphas = torch.cat([a.flatten() for a in uniform.lrs.values()])
    assert alphas.min() >= 0.005 and alphas.max() <= 0.1 and alphas.std() > 0.01
    assert all(a.shape == p.shape for a, (_, p) in zip(uniform.lrs.values(), uniform.model.named_parameters()))
    maml = MetaSGD(SineMLP(), init_lr=0.01, learn_lr=False)
    assert all(a.dim() == 0 and not a.requires_grad and float(a) == pytest.approx(0.01) for a in maml.lrs.values())
    assert not any(a.any() for a in MetaSGD(SineMLP(), init_lr=0.0).lrs.values())  # learned: may start at 0


@pytest.mark.parametrize("init_lr, learn_lr, least", [(-0.1, True, "0 or more"), ((-0.01, 0.1), True, "0 or more"),
                                                       (0.0, False, "a positive number (MAML's fixed rate)")])
def test_a_rate_that_would_climb_or_never_move_is_refused(init_lr, learn_lr, least):
    with pytest.raises(ValueError, match=re.escape(f"`init_lr` must be {least}: the inner step is θ − α ⊙ ∇L; got")):
        MetaSGD(SineMLP(), init_lr=init_lr, learn_lr=learn_lr)


@pytest.mark.parametrize("kind", ["sine-mlp", "convnet-bn"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("line_search", ["off", "backtracking"])
def test_vmap_equals_loop(kind, first_order, line_search):
    make_model, make_task, loss_fn = CASES[kind]
    # Rates up to 2 make some steps overshoot, so that backtracking has steps to halve and to refuse.
    high = 2.0 if line_search == "backtracking" else 0.2
    meta = MetaSGD(make_model().double(), init_lr=(0.01, high), inner_steps=2, first_order=first_order,
                   line_search=line_search)
    batch = make_task(tasks=3)
    results, grads = {}, {}
    for mode in ("loop", "vmap"):
        meta.zero_grad()
        results[mode] = meta.adapt_tasks(*batch, loss_fn, vectorize=mode)
        results[mode].query_loss.mean().backward()
        grads[mode] = [p.grad.clone() for p in meta.parameters() if p.requires_grad]
    torch.testing.assert_close(results["loop"].query_loss, results["vmap"].query_loss)
    torch.testing.assert_close(results["loop"].support_loss, results["vmap"].support_loss)
    for g_loop, g_vmap in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(g_loop, g_vmap)
    torch.testing.assert_close(results["loop"].step_scale, results["vmap"].step_scale)
    assert results["loop"].support_loss.shape == (3, 3)  # before each of 2 steps, and after
    if line_search == "backtracking":
        assert (results["loop"].step_scale < 1).any(), "no step was shortened: the test does not test backtracking"


def test_adaptation_lowers_the_support_loss():
    meta = MetaSGD(SineMLP(), init_lr=0.02, inner_steps=5)
    result = meta.adapt_tasks(*_regression_task(tasks=4, dtype=torch.float32), F.mse_loss)
    assert (result.support_loss[:, -1] < result.support_loss[:, 0]).all()


def test_nan_in_support_set_names_step_and_task():
    meta = MetaSGD(SineMLP(), init_lr=0.01)
    sx, sy, qx, qy = _regression_task(tasks=4, dtype=torch.float32)
    sy[2, 0, 0] = float("nan")
    result = meta.adapt_tasks(sx, sy, qx, qy, F.mse_loss)
    with pytest.raises(InnerLoopDivergedError, match="inner step 0 of task 2") as info:
        result.raise_if_not_finite()
    assert (info.value.step, info.value.task) == (0, 2)


def test_divergence_at_a_later_step_is_named():
    meta = MetaSGD(SineMLP(), init_lr=1e30, inner_steps=3, line_search="off")
    result = meta.adapt_tasks(*_regression_task(tasks=2, dtype=torch.float32), F.mse_loss)
    with pytest.raises(InnerLoopDivergedError, match=r"support loss at inner step [12] of task 0") as info:
        result.raise_if_not_finite()
    assert info.value.step in (1, 2) and info.value.steps == 3
    with pytest.raises(InnerLoopDivergedError, match="init_lr"):
        meta.adapt(*_regression_task(dtype=torch.float32)[:2], F.mse_loss)


def test_divergence_made_by_the_last_step_is_caught_and_named_as_such():
    # One plain step with a huge rate: the support loss before it is finite, after it infinite.
    meta = MetaSGD(SineMLP(), init_lr=1e30, inner_steps=1, line_search="off")
    sx, sy, qx, qy = _regression_task(tasks=2, dtype=torch.float32)
    with pytest.raises(InnerLoopDivergedError, match=r"support loss after the last inner step \(step 0\)") as info:
        meta.adapt(sx[0], sy[0], F.mse_loss)
    assert (info.value.step, info.value.steps) == (1, 1)
    result = meta.adapt_tasks(sx, sy, qx, qy, F.mse_loss)
    result.query_loss = torch.zeros(2)  # only the support loss after the step is not finite
    with pytest.raises(InnerLoopDivergedError, match=r"support loss after the last inner step \(step 0\) of task 0"):
        result.raise_if_not_finite()


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_backtracking_never_raises_the_support_loss(vectorize):
    # Rates a thousand times past stability: plain steps diverge; backtracked ones halve or refuse them.
    sx, sy, qx, qy = _regression_task(tasks=4, dtype=torch.float64)
    plain = MetaSGD(SineMLP().double(), init_lr=(1.0, 20.0), inner_steps=10, line_search="off")
    assert not torch.isfinite(plain.adapt_tasks(sx, sy, qx, qy, F.mse_loss, vectorize="loop").support_loss).all()
    safe = copy.deepcopy(plain)
    safe.line_search = "backtracking"
    result = safe.adapt_tasks(sx, sy, qx, qy, F.mse_loss, vectorize=vectorize)
    result.raise_if_not_finite()
    assert (result.support_loss[:, 1:] <= result.support_loss[:, :-1]).all()
    assert (result.support_loss[:, -1] < result.support_loss[:, 0]).all(), "no task got better: every step refused"
    allowed = torch.tensor([0.0] + [0.5 ** k for k in range(safe.max_halvings + 1)], dtype=torch.float64)
    assert torch.isin(result.step_scale, allowed).all()
    assert (result.step_scale < 1).any() and (result.step_scale > 0).any()


def test_line_search_auto_backtracks_only_for_several_steps():
    meta = MetaSGD(SineMLP(), init_lr=(1.0, 20.0))
    assert not meta.uses_line_search(1) and meta.uses_line_search(2)
    sx, sy, qx, qy = _regression_task(tasks=2, dtype=torch.float32)
    assert (meta.adapt_tasks(sx, sy, qx, qy, F.mse_loss, steps=1).step_scale == 1).all()  # the paper's step
    assert MetaSGD(SineMLP(), line_search="backtracking").uses_line_search(1)
    assert not MetaSGD(SineMLP(), line_search="off").uses_line_search(5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inner_steps=0), "`inner_steps` must be a positive integer; got 0"),
        (dict(inner_steps=-2), "`inner_steps` must be a positive integer; got -2"),
        (dict(init_lr=float("nan")), "`init_lr` must be finite"),
        (dict(init_lr=(0.1, float("inf"))), "`init_lr` must be finite"),
        (dict(init_lr=(0.2, 0.1)), "low <= high"),
        (dict(init_lr=(0.1, 0.2), learn_lr=False), "fixed scalar rate"),
        (dict(init_lr="fast"), "`init_lr` must be a float"),
        (dict(line_search="armijo"), "`line_search` must be 'auto', 'backtracking' or 'off'; got 'armijo'"),
        (dict(max_halvings=-1), "`max_halvings` must be an integer >= 0; got -1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MetaSGD(SineMLP(), **kwargs)


def test_bad_steps_in_adapt():
    meta = MetaSGD(SineMLP())
    sx, sy, _, _ = _regression_task(dtype=torch.float32)
    with pytest.raises(ValueError, match="`steps` must be a positive integer; got 0"):
        meta.adapt(sx, sy, F.mse_loss, steps=0)


def test_a_model_without_trainable_parameters_is_refused():
    with pytest.raises(ValueError, match="requires_grad=True"):
        MetaSGD(nn.Linear(2, 2).requires_grad_(False))


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.zeros(4, 5, 1),) * 3, "4 tensors"),
        ([torch.zeros(4, 5, 1), torch.zeros(3, 5, 1), torch.zeros(4, 10, 1), torch.zeros(4, 10, 1)],
         r"support_y must have shape .* got shape \(3, 5, 1\)"),
        ([torch.zeros(4, 5, 1), torch.zeros(4, 6, 1), torch.zeros(4, 10, 1), torch.zeros(4, 10, 1)], "same number of examples"),
        ([torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(4, 10, 2), torch.zeros(4, 10, 1)], "same example shape"),
        ([torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(10, 1), torch.zeros(10, 1)], r"got shape \(5, 1\)|same number"),
    ],
)
def test_bad_batch_shapes_are_named(batch, message):
    with pytest.raises(ValueError, match=message):
        check_task_batch(batch)


def test_inference_mode_is_refused_with_the_fix():
    meta = MetaSGD(SineMLP())
    sx, sy, _, _ = _regression_task(dtype=torch.float32)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        meta.adapt(sx, sy, F.mse_loss)


def test_adapt_works_under_no_grad():
    meta = MetaSGD(SineMLP(), init_lr=0.1)
    sx, sy, qx, _ = _regression_task(dtype=torch.float32)
    with torch.no_grad():
        fast = meta.adapt(sx, sy, F.mse_loss)
    assert not torch.equal(meta(qx, fast), meta(qx))


def test_task_batchnorm_matches_torch_batchnorm():
    from metasgd_lightning.methods.models import TaskBatchNorm2d

    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    ours, torchs = TaskBatchNorm2d(4).double(), nn.BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        for bn in (ours, torchs):
            bn.weight.uniform_(0.5, 2), bn.bias.normal_()
        torchs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), torchs(x))


def test_vmap_refuses_second_order_through_native_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.Linear(2 * 14 * 14, 3))
    meta = MetaSGD(model.double(), fast_batch_norm=False)  # the swap would make vmap right
    batch = _image_task(tasks=2)
    with pytest.raises(ValueError, match="vectorize='loop'"):
        meta.adapt_tasks(*batch, F.cross_entropy, vectorize="vmap")
    meta.adapt_tasks(*batch, F.cross_entropy, vectorize="vmap", first_order=True)  # first order is fine
