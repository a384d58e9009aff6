"""Use a trained meta-learner on a new task: load a checkpoint, adapt on a support set, predict.

The adapted model comes back as a plain ``nn.Module`` with the adapted weights: it runs without
Lightning or learn2learn. The support set is tensors (:func:`adapt`) or a folder of images with one
subfolder per class (:func:`adapt_to_folder`), preprocessed as the checkpoint's data module
preprocessed its test images (:func:`checkpoint_transform`).

Example:
    >>> from metasgd_lightning.commands.inference import load_meta_learner, adapt   # doctest: +SKIP
    >>> module = load_meta_learner("runs/sine_5shot/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> model = adapt(module, support_x, support_y)  # doctest: +SKIP
    >>> predictions = model(query_x)  # doctest: +SKIP

    On images (``support/<class name>/*.png``):

    >>> from metasgd_lightning.commands.inference import adapt_to_folder, checkpoint_transform, predict_images  # doctest: +SKIP
    >>> module = load_meta_learner("runs/omniglot_5way_1shot/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> transform = checkpoint_transform(module)  # doctest: +SKIP
    >>> model, class_names = adapt_to_folder(module, "support", transform)  # doctest: +SKIP
    >>> for path, name, probability in predict_images(model, "queries", transform, class_names):  # doctest: +SKIP
    ...     print(path, name, probability)
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor, nn

from datamodules.class_folders import IMAGE_EXTENSIONS, visible
from datamodules.episodic import EpisodicDataModule
from datamodules.images import FileImages
from datamodules.preprocessing import ImageTransform

from .._internals.lightning_internals import recorded_class_path
from ..methods.contract import check_positive_int
from ..training import MetaLearningModule, MetaSGDLightningModule, ReptileLightningModule
from ..training.base import CHECKPOINT_CLASS_KEY
from ..training.checkpointing import checkpoint_is_intact, foreign_format, missing_checkpoint

__all__ = [
    "Prediction",
    "adapt",
    "adapt_to_folder",
    "checkpoint_datamodule",
    "checkpoint_module_class",
    "checkpoint_transform",
    "load_images",
    "load_meta_learner",
    "load_support_folder",
    "predict_images",
]

#: A callable that turns one PIL image into the model's input tensor ``[C, H, W]``.
Transform = Callable[[Image.Image], Tensor]


def load_meta_learner(path: str | Path, map_location: str | torch.device = "cpu", trusted: bool = False) -> MetaLearningModule:
    """Load the meta-learning module a checkpoint holds (e.g. ``last.ckpt`` from ``metasgd fit``): Meta-SGD, MAML or Reptile.

    The class is the one that wrote the checkpoint (:func:`checkpoint_module_class`): a
    :class:`~metasgd_lightning.MetaSGDLightningModule`, :class:`~metasgd_lightning.MAMLLightningModule`,
    :class:`~metasgd_lightning.ReptileLightningModule` or a subclass of your own (import its module first).

    Args:
        path: the checkpoint file.
        map_location: where to put the weights.
        trusted: allow unpickling arbitrary objects. Checkpoints written by the ``metasgd`` CLI do not
            need it; a checkpoint of a module built in Python stores its model as a pickled object and
            does (only for files you trust).

    Returns:
        The module in evaluation mode (``module.method_name`` says which method it holds). It also keeps
        ``checkpoint_path`` and ``datamodule_hparams`` (the settings of the data module it was trained on,
        empty if the checkpoint has none), which :func:`checkpoint_transform` reads.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint, or not one of a meta-learning module.

    Example:
        >>> module = load_meta_learner("runs/reptile_sine/checkpoints/last.ckpt")  # doctest: +SKIP
        >>> module.method_name, type(module).__name__  # doctest: +SKIP
        ('Reptile', 'ReptileLightningModule')
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path, map_location, trusted)
    cls = checkpoint_module_class(checkpoint, path)
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=not trusted)
    # Kept so that checkpoint_transform(module) can rebuild the preprocessing of the training data.
    module.checkpoint_path = path
    module.datamodule_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return module.eval()


def checkpoint_module_class(checkpoint: dict, origin: object = "The checkpoint") -> type[MetaLearningModule]:
    """The module class that wrote a checkpoint dictionary, to load it with.

    In order: the class the checkpoint records (``checkpoint["meta_learning_module"]``, written by
    :class:`~metasgd_lightning.MetaLearningModule`); the class the ``metasgd`` command stored in its
    hyperparameters (a config that named its class); for older checkpoints, inferred:
    Reptile's hyperparameters have ``inner_optimizer``, and a Meta-SGD checkpoint (or MAML's, then
    ``learn_lr=False``) has rates ``meta_learner.lrs.*``. A recorded name resolves only to a subclass of
    :class:`~metasgd_lightning.MetaLearningModule` in a module already imported (or in this package): a
    checkpoint must not make us import or run arbitrary code.

    Args:
        checkpoint: the dictionary ``torch.load`` read from the file.
        origin: how to name the checkpoint in errors (its path).

    Raises:
        ValueError: the recorded class is not an imported ``MetaLearningModule``, or the checkpoint is of
            no meta-learning module.

    Example:
        >>> checkpoint = torch.load("last.ckpt", weights_only=True)  # doctest: +SKIP
        >>> checkpoint_module_class(checkpoint)  # doctest: +SKIP
        <class 'metasgd_lightning.training.metasgd_module.MAMLLightningModule'>
    """
    hparams = checkpoint.get("hyper_parameters")
    hparams = hparams if isinstance(hparams, dict) else {}
    for source, recorded in ((f"records its module class ({CHECKPOINT_CLASS_KEY})", checkpoint.get(CHECKPOINT_CLASS_KEY)),
                             ("names its module class in its hyperparameters (LightningCLI's class_path)", recorded_class_path(hparams))):
        if recorded is None:
            continue
        cls = _resolve_module_class(recorded)
        if cls is None:
            raise ValueError(f"{origin} {source} as {recorded!r}, which is not an imported subclass of "
                             "metasgd_lightning.MetaLearningModule. If it is a module class of your own, import its "
                             "module before loading the checkpoint.")
        return cls
    state = checkpoint.get("state_dict") or {}
    if "inner_optimizer" in hparams:  # only Reptile's recipe has an inner optimiser
        return ReptileLightningModule
    if any(key.startswith("meta_learner.lrs.") for key in state):  # Meta-SGD, or MAML with learn_lr=False
        return MetaSGDLightningModule
    raise ValueError(f"{origin} is not a checkpoint of a meta-learning module (MetaSGDLightningModule, "
                     "MAMLLightningModule, ReptileLightningModule): it records no module class and has neither "
                     "Meta-SGD's rates (meta_learner.lrs.*) nor Reptile's hyperparameters. Give a .ckpt file written "
                     "by `metasgd fit` or by a Trainer fitting one of these modules.")


def _resolve_module_class(class_path: object) -> type[MetaLearningModule] | None:
    """The ``MetaLearningModule`` subclass named ``"<module>.<qualname>"``, or None.

    Only modules already imported, or within this package (whose old paths ``_old_paths`` maps), are
    looked in; nothing else is imported.
    """
    if not isinstance(class_path, str):
        return None
    parts = class_path.split(".")
    package = __package__.split(".")[0]
    for cut in range(len(parts) - 1, 0, -1):  # the longest module path first: "a.b.C.D" may be class D of a.b.C
        module_name = ".".join(parts[:cut])
        module = sys.modules.get(module_name)
        if module is None and parts[0] == package:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        obj = module
        for name in parts[cut:] if module is not None else ():
            obj = getattr(obj, name, None)
        if module is not None and isinstance(obj, type) and issubclass(obj, MetaLearningModule):
            return obj
    return None


def _read_checkpoint(path: Path, map_location: str | torch.device = "cpu", trusted: bool = False) -> dict:
    """The checkpoint dictionary at ``path``, checked to hold a state dict of a meta-learner."""
    if not path.is_file():
        raise missing_checkpoint(path)
    other = foreign_format(path)
    if other:
        raise ValueError(f"{path} is not a PyTorch checkpoint: it is {other}. Give the path of a .ckpt file written by "
                         "`metasgd fit` (by default under runs/<config name>/checkpoints/).")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as error:
        if not checkpoint_is_intact(path):
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: it is truncated or corrupt "
                             f"({str(error).splitlines()[0]}).") from error
        hint = "" if trusted else (" If it is a checkpoint of a module built in Python (its model is pickled) and you "
                                   "trust it, pass trusted=True.")
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint: {str(error).splitlines()[0]}.{hint}") from error
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not state or not any(key.startswith("meta_learner.") for key in state):
        raise ValueError(f"{path} is not a checkpoint of a meta-learning module (MetaSGDLightningModule, "
                         "MAMLLightningModule, ReptileLightningModule): it has no meta_learner.* weights. Give a .ckpt "
                         "file written by `metasgd fit`.")
    return checkpoint


def adapt(module: MetaLearningModule, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> nn.Module:
    """Adapt the meta-learned model to one task and return it as a plain ``nn.Module``.

    Args:
        module: a trained module (see :func:`load_meta_learner`).
        support_x: the task's support inputs, ``[examples, ...]`` (for images ``[examples, C, H, W]``,
            preprocessed as in training).
        support_y: their targets: class indices ``0..N-1`` (classification) or values (regression).
        steps: inner steps (default: the module's ``eval_inner_steps``).

    Returns:
        A copy of the model whose weights are the adapted θ'; it needs neither Lightning nor learn2learn.

    Raises:
        ValueError: the support set does not fit the model (number of ways, a class without examples,
            input shape).
    """
    check_positive_int("steps", steps, or_none=True)  # before the work, not after the checks below
    device = next(module.parameters()).device
    support_x, support_y = support_x.to(device), support_y.to(device)
    if support_x.shape[0] != support_y.shape[0]:
        raise ValueError(f"support_x and support_y must hold the same number of examples; got {support_x.shape[0]} "
                         f"and {support_y.shape[0]}.")
    with torch.no_grad():
        outputs = module.meta_learner(support_x)  # also checks the input shape (ConvNet4 names it)
    if module.task == "classification":
        ways = outputs.shape[-1]
        if support_y.is_floating_point():
            raise ValueError(f"Classification support labels must be integer class indices; got {support_y.dtype}.")
        present = set(support_y.unique().tolist())
        if present != set(range(ways)):
            missing = sorted(set(range(ways)) - present)
            extra = sorted(present - set(range(ways)))
            raise ValueError(
                f"The model was meta-trained for {ways}-way tasks: the support set needs labels 0..{ways - 1}, each with "
                f"at least one example. Missing classes: {missing or 'none'}; labels out of range: {extra or 'none'}."
            )
    fast = module.adapt_task(support_x, support_y, steps)
    adapted = copy.deepcopy(module.model)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            param.copy_(fast[name])
    return adapted.requires_grad_(False).eval()


# -- images in folders ------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """The predicted class of one image, and the adapted model's probability for it."""

    path: Path
    class_name: str
    probability: float


def checkpoint_transform(source: MetaLearningModule | str | Path, split: str = "test") -> ImageTransform:
    """The preprocessing of the images a checkpoint was trained on, rebuilt from its data module's settings.

    A checkpoint written by ``metasgd fit`` records its data module's class and arguments. This builds
    that data module again (it reads no data) and returns its ``transform(split)``: for ``"test"`` the
    resize, channels, inversion and normalisation of evaluation, without augmentation.

    Args:
        source: a module from :func:`load_meta_learner`, or the path of its checkpoint.
        split: the split whose preprocessing to rebuild (``"train"`` adds the training augmentation).

    Raises:
        ValueError: the checkpoint does not record an image data module this can rebuild (e.g. it was
            trained from Python); the message says to pass ``transform=`` instead.

    Example:
        >>> checkpoint_transform("runs/omniglot_5way_1shot/checkpoints/last.ckpt")  # doctest: +SKIP
        ImageTransform(image_size=28, channels=1, invert=True, resample=LANCZOS)
    """
    origin, task = _origin_and_task(source)
    if task == "regression":
        class_path = recorded_class_path(_recorded_datamodule(source)) or "values"
        raise ValueError(f"{origin} is a regression checkpoint (meta-trained on {class_path}, e.g. sine curves): it "
                         "predicts numbers, not classes, so it cannot classify images. Give a checkpoint of an image "
                         "classification config (e.g. configs/omniglot_5way_1shot.yaml), or adapt this one with "
                         "adapt() on tensors.")
    fix = ("Pass the preprocessing of the model's training images as `transform`, e.g. "
           "transform=OmniglotDataModule(image_size=28).transform('test').")
    datamodule = checkpoint_datamodule(source, EpisodicDataModule, fix)
    return datamodule.transform(split)


def checkpoint_datamodule(source: MetaLearningModule | str | Path, base: type = LightningDataModule,
                          fix: str = "") -> LightningDataModule:
    """The data module a checkpoint was trained on, built again from the class and arguments it records.

    Building it reads no data (call its ``setup`` for that). Only a class already imported is used (the
    provided data modules, or one the caller imported), as Lightning itself does: a checkpoint must not
    make us import or run arbitrary code.

    Args:
        source: a module from :func:`load_meta_learner`, or the path of its checkpoint.
        base: the class the data module must be a subclass of.
        fix: a sentence added to each error (what to do instead).

    Raises:
        ValueError: the checkpoint records no data module, not its class (it was not written by ``metasgd
            fit``), a class not imported or not a ``base``, or arguments the class refuses.
    """
    origin = Path(source) if isinstance(source, (str, Path)) else getattr(source, "checkpoint_path", "This module")
    hparams = _recorded_datamodule(source)
    if not hparams:
        raise ValueError(f"{origin} records no data module, so how its training data was prepared is unknown. {fix}")
    class_path = recorded_class_path(hparams, pop=True)
    if class_path is None:
        raise ValueError(f"{origin} records its data module's arguments but not its class (it was not written by "
                         f"`metasgd fit`). {fix}")
    module_name, _, class_name = str(class_path).rpartition(".")
    cls = getattr(sys.modules.get(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        what = "image data module" if base is EpisodicDataModule else "data module"
        raise ValueError(f"{origin} was trained on {class_path}, which is not an imported {what} (a subclass of "
                         f"{base.__module__.split('.')[0]}.{base.__name__}). If it is your own, import its module "
                         f"first. {fix}")
    parameters = inspect.signature(cls).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    arguments = {k: v for k, v in hparams.items() if not k.startswith("_") and (any_keyword or k in parameters)}
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{origin}: its data module {class_path} cannot be rebuilt from the recorded arguments "
                         f"({error}). {fix}") from error


def _recorded_datamodule(source: MetaLearningModule | str | Path) -> dict:
    """A copy of the data module settings a checkpoint records (their class included), or {}."""
    if isinstance(source, (str, Path)):
        hparams = _read_checkpoint(Path(source)).get("datamodule_hyper_parameters")
    else:
        hparams = getattr(source, "datamodule_hparams", None)
    return dict(hparams or {})


def _origin_and_task(source: MetaLearningModule | str | Path) -> tuple[object, str | None]:
    """How to name a checkpoint in messages, and the task its module recorded (None if unknown)."""
    if isinstance(source, (str, Path)):
        hparams = _read_checkpoint(Path(source)).get("hyper_parameters") or {}
        return Path(source), hparams.get("task") if isinstance(hparams, dict) else None
    return getattr(source, "checkpoint_path", "This module"), getattr(source, "task", None)


def load_support_folder(folder: str | Path, transform: Transform) -> tuple[Tensor, Tensor, list[str]]:
    """Read a support set stored as one subfolder of images per class.

    The classes are the subfolders of ``folder`` sorted by name; the i-th is label ``i``. Each holds its
    class's images (the suffixes the data modules read: .png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp,
    .ppm, .pgm); hidden files and folders are skipped::

        support/
            cat/  1.jpg  2.jpg
            dog/  1.jpg  2.jpg

    Args:
        folder: the support set's folder.
        transform: PIL image -> tensor ``[C, H, W]``, e.g. :func:`checkpoint_transform` of the model.

    Returns:
        ``(x, y, class_names)``: images ``[examples, C, H, W]``, labels ``[examples]`` in ``0..N-1``
        (ordered by class) and the N class names.

    Raises:
        FileNotFoundError: no folder at ``folder``.
        ValueError: no class folders, a class folder without images, or images that the transform
            gives different shapes.
        datamodules.images.ImageReadError: an image that cannot be decoded (naming the file).

    Example:
        >>> x, y, names = load_support_folder("support", checkpoint_transform(module))  # doctest: +SKIP
        >>> names, y.tolist()  # doctest: +SKIP
        (['cat', 'dog'], [0, 0, 1, 1])
    """
    folder = Path(folder).expanduser()
    layout = f"one subfolder per class holding its images, e.g. {folder}/<class name>/*.png"
    if not folder.is_dir():
        raise FileNotFoundError(f"`folder`: no folder at {folder}. A support set is {layout}.")
    classes = {path.name: _image_files(path) for path in sorted(folder.iterdir()) if path.is_dir() and visible(path.name)}
    if not classes:
        raise ValueError(f"`folder`: {folder} holds no class folders. A support set is {layout}.")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ValueError(f"`folder`: the class folder(s) {empty} in {folder} hold no images; every class needs at "
                         f"least one support image ({', '.join(IMAGE_EXTENSIONS)}).")
    x = _decode([path for files in classes.values() for path in files], transform, "folder")
    y = torch.tensor([label for label, files in enumerate(classes.values()) for _ in files])
    return x, y, list(classes)


def load_images(images: str | Path | Sequence[str | Path], transform: Transform) -> tuple[Tensor, list[Path]]:
    """Read query images: one file, a list of files, or every image in a folder (and its subfolders).

    Args:
        images: an image file, a folder (its image files, sorted by path), or a sequence of files.
        transform: PIL image -> tensor ``[C, H, W]``, the same as for the support set.

    Returns:
        ``(x, paths)``: the images ``[n, C, H, W]`` and their files, in the same order.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder without images, or images that the transform gives different shapes.
        datamodules.images.ImageReadError: an image that cannot be decoded (naming the file).
    """
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    files: list[Path] = []
    for path in paths:
        path = path.expanduser()
        if path.is_dir():
            found = _image_files(path, recursive=True)
            if not found:
                raise ValueError(f"`images`: the folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"`images`: no file or folder at {path}.")
    if not files:
        raise ValueError("`images` is empty: give an image file, a folder of images or a list of files.")
    return _decode(files, transform, "images"), files


def adapt_to_folder(module: MetaLearningModule | str | Path, folder: str | Path,
                    transform: Transform | None = None, steps: int | None = None) -> tuple[nn.Module, list[str]]:
    """Adapt a trained classifier to the classes of a support folder (one subfolder of images per class).

    The images are preprocessed as the model's test images were (``transform``, by default rebuilt from
    the checkpoint with :func:`checkpoint_transform`), then :func:`adapt` runs on them.

    Args:
        module: a trained module (see :func:`load_meta_learner`) or the path of its checkpoint.
        folder: the support set, laid out as :func:`load_support_folder` reads it; as many class folders
            as the model's ways.
        transform: PIL image -> tensor (default: the checkpoint's test preprocessing).
        steps: inner steps (default: the module's ``eval_inner_steps``).

    Returns:
        ``(model, class_names)``: the adapted plain ``nn.Module`` (output ``i`` is ``class_names[i]``)
        and the class names, sorted as the folders.

    Raises:
        FileNotFoundError: no folder at ``folder``.
        ValueError: a regression model, a number of class folders other than the model's ways, a class
            folder without images, images whose shape after ``transform`` the model does not take, or a
            checkpoint whose preprocessing cannot be rebuilt (pass ``transform``).
        datamodules.images.ImageReadError: an image that cannot be decoded (naming the file).

    Example:
        >>> model, class_names = adapt_to_folder("last.ckpt", "support")  # doctest: +SKIP
        >>> class_names  # doctest: +SKIP
        ['cat', 'dog', 'fox', 'hen', 'owl']
    """
    if isinstance(module, (str, Path)):
        module = load_meta_learner(module)
    if module.task != "classification":
        origin = getattr(module, "checkpoint_path", "This module")
        raise ValueError(f"{origin} is a {module.task} checkpoint: adapt_to_folder needs a classification model; this "
                         f"one was meta-trained for {module.task} (it predicts numbers, not classes). Use adapt() with "
                         "tensors.")
    if transform is None:
        transform = checkpoint_transform(module)
    x, y, class_names = load_support_folder(folder, transform)
    ways = _run(module.model, x, "folder").shape[-1]
    if len(class_names) != ways:
        raise ValueError(f"The model was meta-trained for {ways}-way tasks, so `folder` needs {ways} class folders; "
                         f"got {len(class_names)} in {Path(folder)}: {class_names}.")
    return adapt(module, x, y, steps), class_names


def predict_images(model: nn.Module, images: str | Path | Sequence[str | Path], transform: Transform,
                   class_names: Sequence[str]) -> list[Prediction]:
    """Predict the class of each query image with an adapted model.

    All images go through the model as one batch, as a task's query set does in meta-training and
    testing (the provided models normalise with the statistics of the batch they see).

    Args:
        model: the adapted model (see :func:`adapt_to_folder`).
        images: an image file, a folder of images (and subfolders), or a sequence of files.
        transform: the preprocessing of the support images.
        class_names: the name of each of the model's outputs (from :func:`adapt_to_folder`).

    Returns:
        One :class:`Prediction` ``(path, class_name, probability)`` per image, in the order of the files.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: images whose shape after ``transform`` the model does not take (naming the expected
            and given shapes), or ``class_names`` not one name per output.
        datamodules.images.ImageReadError: an image that cannot be decoded (naming the file).

    Example:
        >>> for path, name, probability in predict_images(model, "queries", transform, class_names):  # doctest: +SKIP
        ...     print(f"{path}: {name} ({probability:.0%})")
        queries/a.png: cat (91%)
    """
    x, paths = load_images(images, transform)
    logits = _run(model, x, "images")
    if logits.dim() != 2 or logits.shape[-1] != len(class_names):
        raise ValueError(f"`class_names` must name each of the model's {logits.shape[-1]} outputs; got "
                         f"{len(class_names)} names. Pass the names that adapt_to_folder returned.")
    probability, label = logits.softmax(-1).max(-1)
    return [Prediction(path, class_names[i], float(p)) for path, i, p in zip(paths, label.tolist(), probability)]


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and below it, if ``recursive``), sorted; hidden ones skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates
                  if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                  and all(visible(part) for part in path.relative_to(folder).parts))


def _decode(paths: Sequence[Path], transform: Transform, argument: str) -> Tensor:
    """Decode and transform ``paths`` exactly as the data modules do, and stack them."""
    # FileImages is the data modules' reader: the same decoding, and an ImageReadError naming the file.
    source = FileImages([str(p) for p in paths], [0] * len(paths), {0: argument}, transform)
    tensors = [source[i][0] for i in range(len(source))]
    for path, x in zip(paths, tensors):
        if not isinstance(x, Tensor):
            raise ValueError(f"`transform` must turn a PIL image into a tensor; it gave {type(x).__name__} for "
                             f"{path}.")
        if x.shape != tensors[0].shape:
            raise ValueError(f"`{argument}`: after the transform, {path} has shape {list(x.shape)} but {paths[0]} has "
                             f"{list(tensors[0].shape)}. The transform must give every image one size (set its "
                             "image_size).")
    return torch.stack(tensors)


def _run(model: nn.Module, x: Tensor, argument: str) -> Tensor:
    """``model(x)`` without gradients; images it cannot take raise an error naming ``argument`` and the shapes."""
    given = list(x.shape[1:])
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    hint = "Preprocess them as the model's training images: transform=checkpoint_transform(module)."
    if isinstance(channels, int) and isinstance(size, int) and given != [channels, size, size]:
        raise ValueError(f"`{argument}`: after the transform the images have shape {given} ([channels, height, "
                         f"width]), but the model takes {[channels, size, size]}. {hint}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.device, parameter.dtype)
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError) as error:  # a model of the user's own: whatever it raises on a bad shape
        raise ValueError(f"`{argument}`: the model cannot take the images, of shape {given} after the transform "
                         f"({str(error).splitlines()[0]}). {hint}") from error
