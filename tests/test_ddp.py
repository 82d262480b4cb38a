"""Data-parallel training: 2 Gloo processes == 1 process on the same global batch.

The 2-rank job runs the real command line (``hjepa train``) in two spawned processes with the
environment ``torchrun`` sets (RANK, WORLD_SIZE, ...), stopped after one step and resumed, with
gradient accumulation and SIGReg (whose statistic is aggregated across ranks with gradient).
Its checkpoint must match a single-process run step for step: losses, weights (the EMA target
encoder included) and AdamW moments.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest
import torch

from hjepa.cli import main
from hjepa.config import load_config
from hjepa.data.augment import BatchAugment
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.models.hjepa import MaskIndices
from hjepa.train.distributed import DistEnv, setup
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import Trainer

from .conftest import TINY

DDP_OVERRIDES = [
    *TINY,
    "train.batch_size=16",
    "train.accum_steps=2",  # 2 ranks x 2 micro-batches of 4
    "train.max_steps=2",
    "model.drop_path=0.0",  # the one draw made per rank
    "loss.regularizer=sigreg",
    "loss.sigreg_slices=64",
    "train.knn_bank_size=32",
    "train.knn_query_size=16",
    "data.name=synthetic",
    "train.device=cpu",
]
MODULES = ("context_encoder", "target_encoder", "predictor", "heads")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, ports: list[int], run_dir: str) -> None:
    """One torchrun-style rank: the environment torchrun sets, then the real command line."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    sys.stdout = open(f"{run_dir}.rank{rank}.out", "w")  # noqa: SIM115 (closed at exit)
    args = ["train", "--config", "quickstart", *DDP_OVERRIDES, f"run.dir={run_dir}"]
    # Stopped after one step, then resumed: a fresh process group each time, as two jobs.
    for port, extra in zip(ports, (["train.stop_after=1"], [])):
        os.environ["MASTER_PORT"] = str(port)
        assert main(args + extra) == 0
    sys.stdout.flush()


def test_two_ranks_match_one_process_step_for_step_with_resume(tmp_path, run_ranks):
    ddp_dir = tmp_path / "ddp"
    ports = [_free_port(), _free_port()]
    run_ranks(_rank_main, (2, ports, str(ddp_dir)), nprocs=2, start_method="spawn")
    outputs = [(tmp_path / f"ddp.rank{r}.out").read_text() for r in range(2)]
    assert "trained 2/2 steps" in outputs[0] and "trained" not in outputs[1]  # rank 0 reports

    cfg = load_config("quickstart", DDP_OVERRIDES)
    cfg.run.dir = str(tmp_path / "single")
    single = Trainer(cfg)
    single.fit()

    ddp_log = read_metrics(ddp_dir, "train")
    single_log = read_metrics(single.run_dir, "train")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [1, 2]
    for a, b in zip(ddp_log, single_log):
        for key in ("loss", "loss_level0", "sigreg"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
        assert a["images_per_s"] > 0

    ddp_state = torch.load(ddp_dir / "checkpoints" / "last.pt", weights_only=True)
    single_state = single.state_dict()
    assert ddp_state["step"] == single_state["step"] == 2
    for name in MODULES:
        for key, value in single_state[name].items():
            torch.testing.assert_close(ddp_state[name][key], value, rtol=0, atol=1e-5, msg=key)
    target = ddp_state["target_encoder"]["blocks.0.attn.qkv.weight"]
    context = ddp_state["context_encoder"]["blocks.0.attn.qkv.weight"]
    assert not torch.equal(target, context)  # the EMA target is its own copy, and it moved
    moments = [
        (a["exp_avg"], b["exp_avg"])
        for a, b in zip(
            ddp_state["optimizer"]["state"].values(), single_state["optimizer"]["state"].values()
        )
    ]
    assert moments and all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in moments)
    # One metrics record per step: ranks other than 0 log nothing.
    records = (ddp_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(r)["kind"] == "train" for r in records) == 2


def test_augmentation_shards_interleave_to_the_global_batch():
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    augment = BatchAugment(8, scale=(0.2, 1.0), flip_prob=0.5)
    whole = augment(images, torch.Generator().manual_seed(3))
    for rank in range(3):
        part = augment(images[rank::3], torch.Generator().manual_seed(3), shard=(rank, 3))
        torch.testing.assert_close(part, whole[rank::3], rtol=0, atol=1e-6)
    assert not torch.allclose(whole[0], whole[3])  # the shards' crops differ from each other


def test_mask_indices_rows_and_moves_keep_shared_levels_shared():
    masks = MultiBlockMaskSampler(8, levels=3).sample(6, torch.Generator().manual_seed(0))
    index = MaskIndices.from_masks(masks)
    assert index.blocks[1] is index.blocks[0] and index.blocks[2] is index.blocks[0]
    part = index.rows(DistEnv(rank=1, world_size=2).shard()).to("cpu")
    assert part.blocks[2] is part.blocks[0]
    torch.testing.assert_close(part.context, index.context[1::2])
    torch.testing.assert_close(part.cells[2], index.cells[2][1::2])
    # Every row's context indices are exactly that row's context mask.
    for row, b in zip(part.context, range(1, 6, 2)):
        assert set(row.tolist()) == set(masks.context[b].nonzero().flatten().tolist())
    gentle = MultiBlockMaskSampler(8, levels=2, scale_mode="gentle")
    separate = MaskIndices.from_masks(gentle.sample(4, torch.Generator().manual_seed(0)))
    assert separate.blocks[1] is not separate.blocks[0]


def test_setup_is_single_process_without_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env, device = setup(torch.device("cpu"))
    assert (env.rank, env.world_size, env.enabled, env.is_main) == (0, 1, False, True)
    assert device == torch.device("cpu") and env.shard() == slice(0, None, 1)


def test_batch_that_does_not_split_over_ranks_and_accumulation_is_refused(tiny_config, monkeypatch):
    from hjepa.config import ConfigError

    cfg = tiny_config("train.batch_size=10", "train.accum_steps=2")
    monkeypatch.setattr(
        "hjepa.train.trainer.distributed.setup",
        lambda device: (DistEnv(rank=0, world_size=2), device),
    )
    with pytest.raises(ConfigError, match="split evenly over 2 rank"):
        Trainer(cfg)


def _sleep_forever(rank: int) -> None:
    time.sleep(3600)


def test_a_hung_rank_fails_the_test_instead_of_hanging_the_suite(run_ranks):
    with pytest.raises(pytest.fail.Exception, match="did not exit within 1 s"):
        run_ranks(_sleep_forever, (), nprocs=1, start_method="fork", timeout=1)
