"""A run's settings: :class:`TrainConfig`, its presets, and the checks of every value.

This module owns what a run *is*: each field carries its help text and its group (the CLI's
``--help`` and flags are generated from these fields, ``jaxnets.cli``), the named presets
live in :data:`PRESETS` (the one registry; ``results/reproduce.py`` uses it too), every
value is range-checked in :meth:`TrainConfig.validate` with the flag's name in the message,
and :func:`parse_setting` reads a setting from text with one syntax everywhere (the CLI,
``--sweep``, a saved ``config.json``).
"""

from __future__ import annotations

import dataclasses
import math

from jaxnets.models import FAMILIES

#: Architectures (the family registry, jaxnets.models.FAMILIES), optimizers, schedules and
#: input normalisations a run can name.
MODELS = tuple(FAMILIES)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULES = ("constant", "cosine", "onecycle", "step", "linear")
PAD_MODES = ("zeros", "reflect")
FLIPS = ("random", "alternating", "none")
LOSS_REDUCTIONS = ("mean", "sum")
NORMALIZATIONS = ("channel", "mean_image", "imagenet")
GRAD_PATHS = ("autodiff", "manual")
#: Seeds are drawn into ``jax.random.key`` as uint32.
SEED_LIMIT = 2**32

#: The groups of ``--help``, in order.
GROUPS = ("data", "model", "optimisation", "run and output", "multi-device", "performance")


def _setting(default, help, group, **extra):
    """A TrainConfig field with its help text and ``--help`` group."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **extra})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; the CLI's flags, defaults and help are generated from these fields."""

    # data
    dataset: str = _setting("mnist", "mnist or cifar10", "data", choices=("mnist", "cifar10"))
    data_dir: str | None = _setting(
        None, "where the dataset's standard files are, or are downloaded to (default: $JAXNETS_DATA_DIR, else "
              "~/.cache/jaxnets/data)", "data")
    data_source: str = _setting(
        "auto", "auto: the files in the data dir, downloaded there when missing; files: never download; "
                "tfds: tensorflow-datasets' prepared copy, never downloads (needs the [tfds] extra)", "data")
    val_size: int = _setting(5000, "training examples held out for validation (seeded split; 0: none)", "data")
    train_subset: int = _setting(0, "use only the first N training images (0: all)", "data")
    classes: tuple = _setting(
        (), "keep only these classes, e.g. 5,6,7,8,9, in the training, validation and test splits, relabelled "
            "0..k-1 in the order given (the model gets k outputs; default: all)", "data")
    labels_per_class: int = _setting(
        0, "train on N labelled images of each class: a class-balanced subset of the training pool drawn with "
           "--seed, before the validation split, which comes out of these images (0: all)", "data")
    normalize: str = _setting(
        "channel", "channel: per-channel mean/std of the training split; mean_image: subtract the mean image "
                   "from raw 0..255 pixels (the course); imagenet: ImageNet's per-channel mean/std (what "
                   "ImageNet-pretrained weights expect; --pretrained says so when the file's head has 1000 "
                   "classes)", "data", choices=NORMALIZATIONS)
    image_size: int = _setting(
        0, "resize the images to NxN on the device, bilinear (half-pixel centres, no antialiasing when "
           "shrinking), after normalisation, in training, evaluation and load_run(...).predict; the model is "
           "built for NxN (0: the images as loaded)", "data")
    augment: bool = _setting(
        False, "random crops from a 4-pixel zero-padded copy, on the device; CIFAR-10 also gets horizontal flips "
               "(digits are not mirror-symmetric, so MNIST gets crops only); --translate, --pad-mode and --flip "
               "set what it does", "data")
    translate: int = _setting(4, "--augment: random translation by up to this many pixels each way, a crop of a "
                                 "padded copy (0: none)", "data")
    pad_mode: str = _setting("zeros", "--augment: how the translation's copy is padded: zeros, or reflect "
                                      "(mirrored edge pixels, airbench's)", "data", choices=PAD_MODES)
    flip: str = _setting(
        "random", "--augment on CIFAR-10: random (each image flipped with probability 1/2 at every step), "
                  "alternating (each image's flip drawn once for the run and inverted every odd epoch, "
                  "airbench's) or none", "data", choices=FLIPS)
    tta: bool = _setting(
        False, "test-time augmentation in every evaluation (validation and test): logits averaged over 6 views, "
               "1/4 the image, 1/4 its mirror, 1/8 each of the two 1-pixel reflect-padded diagonal shifts and "
               "their mirrors (airbench's); 6x the evaluation cost; CIFAR-10 only (digits are not "
               "mirror-symmetric)", "data")
    # model
    model: str = _setting(
        "mlp", "; ".join(f"{f.name}: {f.help}" for f in FAMILIES.values()), "model", choices=MODELS)
    hidden_units: tuple = _setting(
        (1024, 1024), "MLP hidden sizes, e.g. 300x100 for two layers, none for logistic regression", "model")
    conv_plan: tuple = _setting(
        (), "ConvNet layers: a width is conv3x3-BN-ReLU, M a 3x3/2 max pool, e.g. 32,32,M,64,64,M "
            "(default: the course's mini-VGG)", "model")
    stem: str = _setting(
        "imagenet", "ResNet stem: imagenet (7x7/2 conv, 3x3/2 max pool: torchvision's) or cifar (3x3/1 conv, "
                    "no pool: for 32x32 images)", "model", choices=("imagenet", "cifar"))
    activation: str = _setting("relu", "MLP activation", "model")
    batch_norm: bool = _setting(False, "MLP: batch norm between each linear layer and its activation", "model")
    dropout: float = _setting(0.2, "MLP dropout rate after each hidden activation", "model")
    init: str = _setting("kaiming", "weight init: kaiming, lecun, pytorch (torch.nn defaults) or course "
                                    "(N(0, 1e-4^2))", "model")
    pretrained: str | None = _setting(
        None, "initialise a new run from a state dict: a .safetensors or PyTorch .pth file, or a known name "
              "(efficientnet_lite0); resnet18/resnet34 read torchvision's names, efficientnet_lite0 the "
              "efficientnet_pytorch ones; a head of another class count is replaced by a fresh init (said in "
              "the log); config.json records the file and its SHA-256. A resumed run loads its own checkpoint",
        "model")
    new_head: bool = _setting(
        False, "with --pretrained: initialise the head fresh even when the file's has the model's class count "
               "(the same number of other classes, e.g. pretrained on classes 0-4, trained on 5-9)", "model")
    freeze: bool = _setting(
        False, "with --pretrained: train the head only (a linear probe on fixed features): the backbone gets "
               "no gradient and no optimizer state and runs in evaluation mode, its batch norm on the loaded "
               "running statistics, which stay as loaded", "model")
    # optimisation
    epochs: int = _setting(10, "training epochs", "optimisation")
    batch_size: int = _setting(128, "examples per step", "optimisation")
    optimizer: str = _setting("adam", "Optax optimizer (docs/optimizers.md: where each differs from PyTorch's)",
                              "optimisation", choices=OPTIMIZERS)
    lr: float = _setting(1e-3, "peak learning rate", "optimisation")
    weight_decay: float = _setting(
        0.0, "weight decay on weights (not biases/BN): decoupled for adamw, L2 on the gradient otherwise",
        "optimisation")
    momentum: float = _setting(0.9, "momentum of --optimizer momentum/nesterov", "optimisation")
    schedule: str = _setting(
        "cosine", "learning-rate schedule: constant, cosine (decay to --final-lr-fraction), onecycle, step (x0.1 at 50% "
        "and 75%), linear (linear decay to --final-lr-fraction, in steps)",
        "optimisation", choices=SCHEDULES)
    warmup_epochs: float = _setting(0.0, "linear warm-up from --warmup-start over this many epochs "
                                         "(constant/cosine/step/linear)", "optimisation")
    warmup_fraction: float = _setting(
        0.0, "linear warm-up over this fraction of all the run's steps instead (airbench: 0.23)", "optimisation")
    warmup_start: float = _setting(0.0, "the warm-up's first multiplier of --lr (airbench: 0.2)", "optimisation")
    final_lr_fraction: float = _setting(
        0.0, "--schedule linear/cosine: the multiplier of --lr the decay ends at (airbench: 0.07)", "optimisation")
    loss_reduction: str = _setting(
        "mean", "the training loss over a batch: mean, or sum (airbench's; its gradient is --batch-size times "
                "the mean's, so --lr x B and L2 --weight-decay / B on a mean loss give the same steps); the "
                "reported losses are per-example means either way", "optimisation", choices=LOSS_REDUCTIONS)
    lookahead_period: int = _setting(
        0, "lookahead every this many steps (0: off): slow = d*slow + (1-d)*fast, then fast = slow, with "
           "d = --lookahead-decay * (t/T)^--lookahead-power at step t of T; at the last step the weights become "
           "the slow ones (airbench: 5)", "optimisation")
    lookahead_decay: float = _setting(0.95 ** 5, "lookahead: d at the last step", "optimisation")
    lookahead_power: float = _setting(3.0, "lookahead: how d rises with the run's progress t/T", "optimisation")
    label_smoothing: float = _setting(0.0, "label smoothing of the cross-entropy targets", "optimisation")
    backbone_lr_scale: float = _setting(
        1.0, "the backbone's learning rate is this times --lr; the head (the network's last layer, fc or "
             "head) trains at --lr (an optimizer parameter group; members of a vmapped sweep may differ in it)",
        "optimisation")
    bias_lr_scale: float = _setting(
        1.0, "batch norm's biases (beta) train at this times --lr (an optimizer parameter group, on top of "
             "--backbone-lr-scale; airbench: 64)", "optimisation")
    grad: str = _setting(
        "autodiff", "gradient path: autodiff (jax.grad) or manual (the hand-written backward passes: the same "
                    "gradients up to rounding, and on CPU the faster path for the ConvNet)", "optimisation",
        choices=GRAD_PATHS)
    max_steps: int = _setting(0, "stop after this many steps (0: the epochs decide)", "optimisation")
    seed: int = _setting(0, "seed of init, split, shuffling, augmentation and dropout", "optimisation")
    # run and output
    out: str | None = _setting(None, "run directory (default: runs/<model>-<dataset>-<timestamp>)",
                               "run and output")
    progress: bool = _setting(True, "progress bar (shown only when stderr is a terminal)", "run and output")
    # multi-device
    devices: int = _setting(
        0, "data parallel over this many devices (0: all local devices, or all devices of a multi-process run); "
           "the batch size is global and must divide evenly; sweeps use one device", "multi-device")
    sync_bn: bool = _setting(False, "with --devices > 1: synchronise batch-norm statistics over all devices "
                                    "(default: --no-sync-bn, per device)", "multi-device")
    # performance
    conv_impl: str = _setting(
        "auto", "convolution kernels: auto (winograd/gemm on CPU, xla on GPU/TPU), winograd, winograd4 "
                "(F(4x4) Winograd from 7x7 up: faster, ~10x the rounding of F(2x2)), gemm or xla",
        "performance")
    eval_batch_size: int = _setting(1000, "batch size of evaluation", "performance")
    chunk_steps: int = _setting(50, "training steps per compiled call (the progress bar advances per call)",
                                "performance")

    def validate(self):
        """Raise ValueError naming the first bad setting as its flag (``--lr``) with the bad value."""
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.conv_plan and self.model == "mlp":
            raise ValueError("--conv-plan is a ConvNet setting; it has no effect with --model mlp")
        if self.model == "mlp" and self.batch_norm and self.batch_size == 1:
            raise ValueError("--batch-size 1 with --batch-norm: batch norm needs more than one example per batch "
                             "to normalise over in training")
        if self.warmup_epochs and self.schedule == "onecycle":
            raise ValueError("--warmup-epochs does not apply to --schedule onecycle (it has its own warm-up); "
                             "drop one of them")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs must be at most --epochs ({self.epochs}), got {self.warmup_epochs}")
        self._check_recipe()
        self._check_fine_tuning()
        return self

    def _check_recipe(self):
        """The augmentation, schedule, loss and lookahead settings that only apply together."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if not self.augment:
            for name in ("translate", "pad_mode", "flip"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"{flag(name)} sets what --augment does; it has no effect without --augment")
        if self.tta and self.dataset == "mnist":
            raise ValueError("--tta averages over mirrored views, and digits are not mirror-symmetric: it is for "
                             "--dataset cifar10 only")
        if self.warmup_fraction:
            if self.warmup_epochs:
                raise ValueError("--warmup-fraction and --warmup-epochs both set the warm-up's length; give one")
            if self.schedule == "onecycle":
                raise ValueError("--warmup-fraction does not apply to --schedule onecycle (it has its own "
                                 "warm-up); drop one of them")
        if self.warmup_start and not (self.warmup_epochs or self.warmup_fraction):
            raise ValueError("--warmup-start is the warm-up's first multiplier; give --warmup-epochs or "
                             "--warmup-fraction too")
        if self.final_lr_fraction and self.schedule not in ("linear", "cosine"):
            raise ValueError(f"--final-lr-fraction applies to --schedule linear or cosine, not {self.schedule}")
        lookahead_defaults = all(getattr(self, n) == defaults[n] for n in ("lookahead_decay", "lookahead_power"))
        if not self.lookahead_period and not lookahead_defaults:
            raise ValueError("--lookahead-decay and --lookahead-power need --lookahead-period N (N > 0)")

    def _check_fine_tuning(self):
        from jaxnets import models

        if self.pretrained is not None:
            if not self.pretrained.strip():
                raise ValueError("--pretrained is empty: give a state-dict file or a known name")
            if FAMILIES[self.model].load_pretrained is None:
                raise ValueError(f"--pretrained: --model {self.model} cannot load checkpoints (the families that "
                                 f"can: {', '.join(models.pretrained_families())})")
        if self.new_head and self.pretrained is None:
            raise ValueError("--new-head replaces the head of a pretrained network: give --pretrained FILE (without "
                             "it every layer is initialised fresh already)")
        if self.freeze and self.pretrained is None:
            raise ValueError("--freeze trains the head of a pretrained network only: give --pretrained FILE "
                             "(without it the frozen backbone would be its random init)")
        if self.freeze and self.backbone_lr_scale != 1.0:
            raise ValueError(f"--backbone-lr-scale {self.backbone_lr_scale:g} has no effect with --freeze (the "
                             f"backbone is not trained); drop one of them")
        from jaxnets.data import SHAPES

        channels = SHAPES[self.dataset].image_shape[-1]
        if self.normalize == "imagenet" and channels != 3:
            raise ValueError(f"--normalize imagenet is for RGB images; {self.dataset} has {channels} channel(s)")
        if self.image_size:
            try:  # the family's own limit (the stem, the downsampling), as its model states it
                FAMILIES[self.model].build(self, (self.image_size, self.image_size, channels),
                                           SHAPES[self.dataset].classes)
            except ValueError as e:
                raise ValueError(f"--image-size {self.image_size} is too small for --model {self.model}: {e}") \
                    from None


def flag(name: str) -> str:
    """The CLI flag of a setting: ``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def choices(name: str):
    """The valid values of a setting with a fixed set of them, else None (looked up late: the
    activation, init, data source and conv implementation lists live with their code)."""
    if name == "activation":
        from jaxnets.layers import ACTIVATIONS
        return tuple(ACTIVATIONS)
    if name == "init":
        from jaxnets.layers import INIT_SCHEMES
        return INIT_SCHEMES
    if name == "data_source":
        from jaxnets.data import SOURCES
        return SOURCES
    if name == "conv_impl":
        from jaxnets.conv import CONV_IMPLS
        return CONV_IMPLS
    return FIELDS[name].metadata.get("choices")


#: Integer settings and the least value each may take (``None``: no integer setting).
_INT_MIN = {"epochs": 1, "batch_size": 1, "eval_batch_size": 1, "chunk_steps": 1, "val_size": 0,
            "train_subset": 0, "labels_per_class": 0, "max_steps": 0, "devices": 0, "seed": 0, "image_size": 0,
            "translate": 0, "lookahead_period": 0}
#: Float settings and their ranges: (low, low inclusive, high, high inclusive).
_FLOAT_RANGE = {"lr": (0.0, False, math.inf, False), "weight_decay": (0.0, True, math.inf, False),
                "momentum": (0.0, True, 1.0, False), "dropout": (0.0, True, 1.0, False),
                "label_smoothing": (0.0, True, 1.0, False), "warmup_epochs": (0.0, True, math.inf, False),
                "warmup_fraction": (0.0, True, 1.0, False), "warmup_start": (0.0, True, 1.0, True),
                "final_lr_fraction": (0.0, True, 1.0, True), "lookahead_decay": (0.0, True, 1.0, True),
                "lookahead_power": (0.0, True, math.inf, False), "backbone_lr_scale": (0.0, False, math.inf, False),
                "bias_lr_scale": (0.0, False, math.inf, False)}


def _check(field, value):
    name, where = field.name, flag(field.name)
    valid = choices(name)
    if valid is not None:
        if value not in valid:
            raise ValueError(f"{where} must be one of {', '.join(valid)}, got {value!r}")
    elif name in _INT_MIN:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        if value < _INT_MIN[name]:
            raise ValueError(f"{where} must be >= {_INT_MIN[name]}, got {value}")
        if name == "seed" and value >= SEED_LIMIT:
            raise ValueError(f"{where} must be below 2**32, got {value}")
    elif name in _FLOAT_RANGE:
        lo, lo_in, hi, hi_in = _FLOAT_RANGE[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        if value < lo or (value == lo and not lo_in) or value > hi or (value == hi and not hi_in):
            interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"{where} must be in {interval}, got {value}")
    elif isinstance(field.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
    elif name == "hidden_units":
        if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                   for v in value):
            raise ValueError(f"{where} must be positive layer sizes like 300x100, got {value!r}")
    elif name == "classes":
        _check_classes(value)
    elif name in ("data_dir", "out"):
        if isinstance(value, str) and not value.strip():  # '' would silently mean the default
            raise ValueError(f"{where} is empty: give a directory, or leave the flag out for the default")
    elif name == "conv_plan":
        for item in value:
            if item != "M" and not (isinstance(item, int) and not isinstance(item, bool) and item > 0):
                raise ValueError(f"{where} items must be positive widths or M, got {item!r} in {value}")


def _check_classes(value):
    """``--classes``: at least two known class ids (both datasets have 10), none twice."""
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"--classes must be class ids like 5,6,7,8,9, got {value!r}")
    if not value:
        return
    bad = [v for v in value if not 0 <= v < 10]
    if bad:
        raise ValueError(f"--classes: unknown class {bad[0]} (the datasets' classes are 0..9)")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise ValueError(f"--classes names class {twice[0]} more than once")
    if len(value) < 2:
        raise ValueError(f"--classes needs at least 2 classes to tell apart, got {format_setting(value, 'classes')}")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_setting(name: str, text: str):
    """One value of setting ``name`` from its text; ValueError saying what was expected.

    The syntax is the same on the command line, in ``--sweep`` and in presets: hidden sizes
    ``300x100`` (``none`` for no hidden layer), a conv plan ``32,32,M,64``, booleans
    true/false, numbers as Python writes them.
    """
    default = FIELDS[name].default
    text = text.strip()
    if name == "hidden_units":
        if not text:  # an empty --hidden-units '' is a slip, not a request for no hidden layer
            raise ValueError("empty: give layer sizes like 200 or 300x100, or none for no hidden layer")
        if text.lower() == "none":
            return ()
        try:
            return tuple(int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"{text!r} is not a list of layer sizes like 200 or 300x100 (or none)") from None
    if name == "classes":
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a list of class ids like 5,6,7,8,9") from None
    if name == "conv_plan":
        items = [v.strip() for v in text.split(",") if v.strip()]
        try:
            return tuple("M" if v.upper() == "M" else int(v) for v in items)
        except ValueError:
            raise ValueError(f"{text!r} is not a list of widths and M (max pool) like 32,32,M,64") from None
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if name in _INT_MIN:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if name in _FLOAT_RANGE:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    return text


#: Named starting points (``--preset``); flags given explicitly override them.
PRESETS = {
    # The course's MLP: one hidden layer of 100, SGD 2e-3, batch 200, 1500 steps,
    # N(0, 1e-4^2) weights, mean-image subtraction without std scaling.
    "course_mlp": dict(model="mlp", dataset="cifar10", hidden_units=(100,), optimizer="sgd",
                       lr=2e-3, batch_size=200, max_steps=1500, epochs=7, init="course",
                       normalize="mean_image", schedule="constant", dropout=0.0, val_size=1000),
    # The course's ConvNet: mini-VGG, Adam 1e-4, batch 32, 5000 steps.
    "course_convnet": dict(model="convnet", dataset="cifar10", optimizer="adam", lr=1e-4,
                           batch_size=32, max_steps=5000, epochs=4, schedule="constant",
                           dropout=0.0, val_size=1000),
    # Our CIFAR-10 ConvNet recipe (results/: 90.6% on CIFAR-10 (JPEG copy)): crops + flips,
    # Nesterov SGD one-cycle, L2 5e-4, label smoothing 0.1, manual backprop. The runs in
    # results/ set --lr, --batch-size and --epochs (and the plan) on top of it.
    "cifar10_recipe": dict(model="convnet", dataset="cifar10", augment=True, optimizer="nesterov", lr=0.2,
                           momentum=0.9, weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1,
                           batch_size=256, epochs=16, grad="manual"),
    # airbench94 (Jordan 2024, arXiv 2404.00498; legacy/airbench94.py) in our flags: its net,
    # all 50,000 training images (no validation split), 476 steps of 1024 (9.9 epochs),
    # Nesterov 0.85 on the summed loss with label smoothing 0.2, its "per 1024 examples"
    # lr 11.5 and decay 0.0153 converted (docs/optimizers.md: lr = 11.5 / (1024 (1 + 1/0.15)),
    # coupled L2 0.0153 * 1024 / 11.5), 23% warm-up from 0.2 then linear to 0.07, lookahead
    # every 5 steps, alternating flips and 2-pixel reflect translation, 6-view TTA, batch
    # norm's biases at 64x the lr (airbench also decays them; --weight-decay does not).
    # Evaluation in batches of 250: with TTA's 6 views, batches of 1000 took over 6 GB and a
    # run on the shared 23 GB CPU host was OOM-killed in its test evaluation.
    "airbench94": dict(model="airbench", dataset="cifar10", val_size=0, batch_size=1024, epochs=10, max_steps=476,
                       optimizer="nesterov", momentum=0.85, lr=11.5 / (1024 * (1 + 1 / (1 - 0.85))),
                       weight_decay=0.0153 * 1024 / 11.5, loss_reduction="sum", label_smoothing=0.2,
                       schedule="linear", warmup_fraction=0.23, warmup_start=0.2, final_lr_fraction=0.07,
                       lookahead_period=5, augment=True, translate=2, pad_mode="reflect", flip="alternating",
                       tta=True, grad="manual", dropout=0.0, bias_lr_scale=64.0, eval_batch_size=250),
}


def from_dict(values: dict, *, where: str = "config") -> TrainConfig:
    """A validated TrainConfig from a dict such as ``config.json``'s ``"config"`` (lists become
    tuples); ValueError naming ``where`` and the unknown or bad setting."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object of settings, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return TrainConfig(**values).validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


#: What a resumed run may change: where its data is read from, how it shows progress, how
#: many devices it spreads over (the same global batches), and more epochs.
RESUME_CHANGES = ("data_dir", "data_source", "devices", "progress", "epochs")


def resume_config(saved: dict, given: dict, *, where: str) -> tuple[TrainConfig, dict]:
    """The settings of a resumed run: ``saved`` (config.json's) with the ``given`` ones applied.

    A given setting must equal the saved one, or be one of :data:`RESUME_CHANGES`
    (``epochs`` only upward); anything else is refused with a ValueError naming the flag and
    both values. Returns the config and the changes, ``{name: (saved, given)}``.
    """
    config = from_dict(saved, where=where)
    changes = {}
    for name, value in given.items():
        if name == "out" or name not in FIELDS:
            continue
        value = tuple(value) if isinstance(value, list) else value
        old = getattr(config, name)
        if value == old:
            continue
        if name not in RESUME_CHANGES:
            raise ValueError(f"{where}: {flag(name)} {format_setting(value)} differs from the run's saved "
                             f"{format_setting(old)}; "
                             f"a resumed run keeps its settings (it may change "
                             f"{', '.join(flag(k) for k in RESUME_CHANGES)}): drop the flag, or start a new run")
        if name == "epochs" and value < old:
            raise ValueError(f"{where}: --epochs {value} is fewer than the run's {old}; a resume can only extend it")
        changes[name] = (old, value)
    try:
        config = dataclasses.replace(config, **{k: new for k, (_, new) in changes.items()}).validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config, changes


def format_setting(value, name=None) -> str:
    """A setting's value as text, the inverse of :func:`parse_setting`: hidden sizes
    ``300x100`` (``none``), a conv plan ``32,M,64``, classes ``5,6,7`` (``name="classes"``;
    ``all`` when empty), floats in their shortest form."""
    if name == "classes":
        return ",".join(map(str, value)) or "all"
    if isinstance(value, tuple):
        if all(isinstance(v, int) for v in value):
            return "x".join(map(str, value)) or "none"
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
