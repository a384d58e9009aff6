"""The CPU fast paths apply to any network a method is given, not only ours, and change no result.

A user's network written from standard torch layers (``nn.Conv2d``, ``nn.BatchNorm2d`` without running
statistics, ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.Linear``): with the fast paths (channels-last images,
the batch norm with a fused double backward) every method gives the adapted weights and meta-gradients
of the plain path, in float64; each path can be turned off; a network that cannot take channels-last
images (``.view``) falls back with a warning and the right results.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metasgd_lightning import MAMLLightningModule, MetaSGD, MetaSGDLightningModule, Reptile, ReptileLightningModule
from metasgd_lightning.methods.fast_paths import ChannelsLastImages, TaskBatchNorm2d, use_task_batch_norm

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 2, 12


def user_network(channels: int = 1, hidden: int = 4) -> nn.Module:
    """What a user writes: standard layers, NCHW, flatten with nn.Flatten."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(2):
        layers += [nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * (SIZE // 4) ** 2, WAYS))
    with torch.no_grad():  # batch-norm weights away from their initial (1, 0), so that they matter
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.double()


class ViewNet(nn.Module):
    """A network whose forward flattens with ``.view``, which channels-last features refuse."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * SIZE * SIZE, WAYS)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def task_batch(tasks: int = 2, channels: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(tasks, WAYS * SHOTS, channels, SIZE, SIZE, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, WAYS * QUERIES, channels, SIZE, SIZE, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).clone()
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).clone()
    return sx, sy, qx, qy


PLAIN = dict(channels_last=False, fast_batch_norm=False)
FAST_PATHS = {"both": {}, "channels-last only": dict(fast_batch_norm=False),
              "batch norm only": dict(channels_last=False)}


def metasgd_step(net, first_order=False, vectorize="loop", **options):
    meta = MetaSGD(copy.deepcopy(net), init_lr=0.3, inner_steps=2, first_order=first_order, line_search="off",
                   **options)
    batch = task_batch()
    result = meta.adapt_tasks(*batch, F.cross_entropy, vectorize=vectorize)
    result.query_loss.mean().backward()
    fast = meta.adapt(batch[0][0], batch[1][0], F.cross_entropy, first_order=True)
    return meta, result.query_loss.detach(), {n: p.grad for n, p in meta.named_parameters()}, fast


def assert_same(ours: dict, plain: dict, what: str) -> None:
    assert ours.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], msg=f"{what}: {name}")


@pytest.mark.parametrize("options", FAST_PATHS.values(), ids=FAST_PATHS.keys())
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_metasgd_fast_paths_give_the_plain_results(options, first_order):
    """Query losses, meta-gradients of θ and α, and one task's adapted weights: as on the plain path."""
    net = user_network()
    meta, loss, grads, fast = metasgd_step(net, first_order, **options)
    _, plain_loss, plain_grads, plain_fast = metasgd_step(net, first_order, **PLAIN)
    torch.testing.assert_close(loss, plain_loss)
    assert_same(grads, plain_grads, "meta-gradient")
    assert_same(fast, plain_fast, "adapted weights")
    batch_norms = [type(m) for m in meta.model.modules() if isinstance(m, (nn.BatchNorm2d, TaskBatchNorm2d))]
    expected = nn.BatchNorm2d if options.get("fast_batch_norm") is False else TaskBatchNorm2d
    assert batch_norms == [expected, expected]


def test_fast_batch_norm_makes_second_order_vmap_right_for_a_users_batch_norm():
    """torch's own batch norm is refused under second-order vmap (wrong gradients); swapped in, vmap agrees
    with the loop."""
    net = user_network()
    with pytest.raises(ValueError, match="vectorize='vmap'.*fast_batch_norm=True"):
        metasgd_step(net, vectorize="vmap", **PLAIN)
    _, loss, grads, _ = metasgd_step(net, vectorize="vmap")
    _, plain_loss, plain_grads, _ = metasgd_step(net, **PLAIN)
    torch.testing.assert_close(loss, plain_loss)
    assert_same(grads, plain_grads, "meta-gradient")


def test_reptile_fast_paths_give_the_plain_direction():
    net = user_network()
    x = torch.cat(task_batch()[::2], 1)
    y = torch.cat(task_batch()[1::2], 1)
    directions = []
    for options in ({}, PLAIN):
        reptile = Reptile(copy.deepcopy(net), inner_lr=0.01, inner_steps=3, **options)
        directions.append(reptile.meta_step(x, y, F.cross_entropy, vectorize="loop").direction)
    assert_same(*directions, "Reptile direction")


def test_swap_keeps_the_parameters_and_the_state_dict():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False, eps=1e-3),
                        nn.Sequential(nn.BatchNorm2d(4)),  # running statistics: not ours to replace
                        nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    weight, keys = net[1].weight, list(net.state_dict())
    assert use_task_batch_norm(net) == ["1"]
    assert isinstance(net[1], TaskBatchNorm2d) and net[1].eps == 1e-3 and net[1].weight is weight
    assert type(net[2][0]) is nn.BatchNorm2d and type(net[3]) is nn.BatchNorm2d
    assert list(net.state_dict()) == keys
    assert use_task_batch_norm(net) == []


def test_channels_last_reaches_the_first_convolution_and_can_be_turned_off():
    seen = []
    for options in ({}, dict(channels_last=False)):
        meta = MetaSGD(user_network(channels=3), init_lr=0.1, **options)
        hook = meta.model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].stride(1) == 1))
        meta(task_batch(channels=3)[0][0])
        hook.remove()
    assert seen == [True, False]
    vmapped = []
    meta = MetaSGD(user_network(), init_lr=0.1)
    meta.model[0].register_forward_pre_hook(lambda m, args: vmapped.append(args[0].dim()))
    torch.func.vmap(lambda x: meta(x, dict(meta.model.named_parameters())))(task_batch()[0])
    assert vmapped == [4]  # under vmap the images are passed as they are (no channels-last for 5-d)


def test_a_network_that_cannot_take_channels_last_falls_back_with_a_warning():
    net = ViewNet().double()
    meta = MetaSGD(copy.deepcopy(net), init_lr=0.1)
    x = task_batch(channels=3)[0][0]
    with pytest.warns(UserWarning, match=r"channels-last images .*\.reshape.*channels_last=False"):
        out = meta(x)
    torch.testing.assert_close(out, net(x))
    assert not meta._images.active
    meta(x)  # no second warning (pytest's filterwarnings=error would fail here otherwise)
    broken = ChannelsLastImages(net)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):  # the model's own error on plain images surfaces
        broken(net, torch.zeros(2, 3, SIZE + 1, SIZE + 1, dtype=torch.float64))


@pytest.mark.parametrize("module_class", [MetaSGDLightningModule, MAMLLightningModule, ReptileLightningModule])
def test_every_module_takes_the_options(module_class):
    module = module_class(user_network(), channels_last=False, fast_batch_norm=False)
    assert module.hparams["channels_last"] is False and module.hparams["fast_batch_norm"] is False
    assert not module.meta_learner._images.active
    assert any(type(m) is nn.BatchNorm2d for m in module.model.modules())
    module = module_class(user_network())
    assert module.meta_learner._images.active
    assert not any(type(m) is nn.BatchNorm2d for m in module.model.modules())
    with pytest.raises(ValueError, match="`channels_last` must be True or False; got 'yes'"):
        module_class(user_network(), channels_last="yes")
