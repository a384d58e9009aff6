"""The places that use another library's private API, because it has no public one, each isolated in one function.

If one of these tests fails after an upgrade, the library changed the private name the function relies
on: fix the function (its docstring says what it needs), not the test.
"""

import torch

from metasgd_lightning.methods.models import TaskBatchNorm2d, functorch_transform_active


def test_torch_still_says_whether_a_functorch_transform_is_running():
    # functorch_transform_active() falls back to True (TaskBatchNorm2d's slower plain-ops path) without it.
    assert callable(getattr(torch._C, "_are_functorch_transforms_active", None)), \
        "torch._C._are_functorch_transforms_active is gone: update metasgd_lightning.methods.models.functorch_transform_active"
    assert functorch_transform_active() is False
    seen = []

    def probe(x):
        seen.append(functorch_transform_active())
        return x.sum()

    torch.func.vmap(probe)(torch.zeros(3, 2))
    torch.func.grad(probe)(torch.zeros(2))
    assert seen == [True, True]


def test_task_batch_norm_takes_the_native_kernel_only_outside_transforms(monkeypatch):
    calls = []
    # the native kernel, through F.batch_norm or (on CPU, with the fused double backward) torch.native_batch_norm
    for owner, name in ((torch.nn.functional, "batch_norm"), (torch, "native_batch_norm")):
        native = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, native=native, **k: calls.append(1) or native(*a, **k))
    norm, x = TaskBatchNorm2d(3), torch.randn(4, 3, 5, 5)
    plain = norm(x)
    assert calls == [1]
    batched = torch.func.vmap(norm)(x[None])[0]
    assert calls == [1]  # under vmap: plain tensor ops
    torch.testing.assert_close(plain, batched)
