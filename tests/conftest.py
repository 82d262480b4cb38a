import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from hjepa.config import load_config

TINY = [
    "data.name=synthetic",
    "data.image_size=32",
    "data.channels=1",
    "data.synthetic_size=128",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.predictor_embed_dim=16",
    "model.predictor_depth=1",
    "model.predictor_num_heads=2",
    "train.batch_size=16",
    "train.knn_every=0",
    "train.knn_bank_size=64",
    "train.knn_query_size=32",
    "train.log_every=1",
    "run.progress=false",
    "run.tensorboard=false",
    "eval.batch_size=64",
]


@pytest.fixture(autouse=True, scope="session")
def _baseline_cache_dir(tmp_path_factory):
    """hjepa eval's baseline cache goes to a temporary folder, never the user's ~/.cache."""
    before = os.environ.get("HJEPA_CACHE_DIR")
    os.environ["HJEPA_CACHE_DIR"] = str(tmp_path_factory.mktemp("hjepa-cache"))
    yield
    if before is None:
        del os.environ["HJEPA_CACHE_DIR"]
    else:
        os.environ["HJEPA_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # small tensors: threading only adds noise on a shared 2-core box


@pytest.fixture
def capture_grads():
    """``capture_grads(module)``: a dict that hooks fill with each trainable parameter's gradient
    as backward leaves it (``train_step`` then clips it and the optimizer step drops it)."""

    def capture(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        grads: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(
                    lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone())
                )
        return grads

    return capture


def tiny(*overrides: str) -> list[str]:
    """TINY under ``overrides``; its synthetic-data size is left out when they name a dataset
    read from files (a key that dataset never reads is refused)."""
    files = any(o.startswith("data.name=") and o != "data.name=synthetic" for o in overrides)
    return [o for o in TINY if not (files and o.startswith("data.synthetic_size="))]


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides: str):
        return load_config(None, [*tiny(*overrides), f"run.dir={tmp_path / 'run'}", *overrides])

    return make


def _run_ranks(fn, args: tuple, nprocs: int, start_method: str, timeout: float = 300.0) -> None:
    """``torch.multiprocessing.start_processes`` that fails the test when a rank has not exited
    after ``timeout`` seconds, instead of hanging the whole suite (a rank's error is raised)."""
    ranks = mp.start_processes(fn, args, nprocs=nprocs, start_method=start_method, join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=min(5.0, timeout)):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"a rank of {fn.__name__} did not exit within {timeout:.0f} s")


@pytest.fixture
def run_ranks():
    """:func:`_run_ranks`: start ``fn(rank, *args)`` ranks and wait for them, with a deadline."""
    return _run_ranks
