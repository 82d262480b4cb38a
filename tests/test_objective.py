"""The training objective's wiring: every term, what it sees, two views, projector, logging.

The loss modules have their own tests (test_sigreg.py, test_vicreg_contrastive.py); here each
term of the trainer's loss is compared with a direct call of that module on the tensors the
term claims to use.
"""

import json

import pytest
import torch

from hjepa.config import SCHEMA, ConfigError, LossConfig, load_config
from hjepa.eval.features import encoder_features
from hjepa.eval.runner import format_table
from hjepa.losses import SIGReg, VICReg, nt_xent, prediction_loss
from hjepa.losses.combined import Objective, context_cells
from hjepa.train.monitor import PROBE_SIGREG_SLICES, OnlineProbe, collapse_warning
from hjepa.train.trainer import Trainer
from tests.conftest import TINY
from tests.test_train import _all_state

ALL_ON = [
    "loss.regularizer=sigreg+vicreg",
    "loss.contrastive=true",
    "loss.sigreg_weight=0.3",
    "loss.sigreg_slices=64",
    "loss.vicreg_weight=0.2",
    "loss.vicreg_var_weight=3.0",
    "loss.vicreg_cov_weight=2.0",
    "loss.vicreg_inv_weight=5.0",
    "loss.contrastive_weight=0.7",
    "loss.contrastive_temperature=0.3",
    "loss.contrastive_hidden_dim=24",
    "loss.contrastive_out_dim=8",
]


def _output(trainer, micro_index: int = 0):
    """One micro-batch through the model with both views, and the inputs used."""
    batches = trainer.batches()
    for _ in range(micro_index + 1):
        micro, images = next(batches)
    x, index, views = trainer.inputs(images, micro)
    second = trainer.inputs.second_view(images, micro)
    return trainer.model(x, index, views, second), (x, index, second)


def _objective(*overrides: str) -> Objective:
    """The objective of TINY + ``overrides``, less the keys its regularizer does not read (a
    config refuses them)."""
    chosen = load_config(None, [*TINY, *(o for o in overrides if not _gated(o))])
    live = [o for o in overrides if not _gated(o) or _gated(o).active(chosen)]
    return Objective.from_config(load_config(None, [*TINY, *live]))


def _gated(override: str):
    return SCHEMA[override.partition("=")[0]].when


# -- each term adds exactly weight x its direct value ------------------------------------------


def test_each_term_adds_its_weight_times_the_direct_call(tiny_config):
    trainer = Trainer(tiny_config(*ALL_ON))
    trainer.model.train()
    out, _ = _output(trainer)
    step = 7
    base, base_terms = _objective("loss.regularizer=none")(out, step)
    pred, per_level = prediction_loss(out.predictions, out.targets, [1.0, 0.7, 0.5])
    torch.testing.assert_close(base, pred, rtol=0, atol=0)
    assert list(base_terms) == ["loss_level0", "loss_level1", "loss_level2"]

    sig = SIGReg(64)(out.context.flatten(0, 1), step=step)
    vic = VICReg(sim_weight=5.0, var_weight=3.0, cov_weight=2.0)(*out.pooled_views)
    ntx = nt_xent(*out.projected_views, temperature=0.3)
    keys = ALL_ON[2:]
    expected = {
        "sigreg": 0.3 * sig,
        "vicreg": 0.2 * vic["total"],
        "sigreg+vicreg": 0.3 * sig + 0.2 * vic["total"],
    }
    for regularizer, added in expected.items():
        total, terms = _objective(f"loss.regularizer={regularizer}", *keys)(out, step)
        torch.testing.assert_close(total - base, added, rtol=1e-5, atol=1e-5)
        if "sigreg" in regularizer:
            torch.testing.assert_close(terms["sigreg"], sig, rtol=0, atol=0)
        if "vicreg" in regularizer:
            assert (
                terms["vicreg_var"] == vic["variance"] and terms["vicreg_inv"] == vic["invariance"]
            )
            assert terms["vicreg_cov"] == vic["covariance"]
    total, terms = _objective("loss.regularizer=none", *keys[:-2], "loss.contrastive=true")(
        out, step
    )
    torch.testing.assert_close(total - base, 0.7 * ntx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["contrastive"], ntx, rtol=0, atol=0)

    # Everything on: the total is the weighted sum of the logged terms, names in order.
    objective = trainer.objective
    total, terms = objective(out, step)
    names = ["loss_level0", "loss_level1", "loss_level2", "sigreg"]
    names += ["vicreg_var", "vicreg_cov", "vicreg_inv", "contrastive"]
    assert list(terms) == objective.term_names == names
    assert objective.weights["vicreg_var"] == pytest.approx(0.2 * 3.0)
    assert objective.weights["vicreg_inv"] == pytest.approx(0.2 * 5.0)
    weighted = sum(objective.weights[k] * terms[k] for k in names)
    torch.testing.assert_close(total, weighted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, base + 0.3 * sig + 0.2 * vic["total"] + 0.7 * ntx)


def test_the_trainer_loss_is_the_objective_of_the_model_output(tiny_config):
    trainer = Trainer(tiny_config(*ALL_ON))
    seen = {}
    trainer.model.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    trainer.model.train()
    loss, *terms = trainer.train_step(next(trainer.step_batches())).terms
    out, (x, second) = seen["out"], (seen["args"][0], seen["args"][3])
    assert second.shape == x.shape and not torch.equal(second, x)  # the model got view two
    sig = SIGReg(64)(out.context.flatten(0, 1), step=0)
    vic = VICReg(5.0, 3.0, 2.0)(*out.pooled_views)["total"]
    pred, _ = prediction_loss(out.predictions, out.targets, [1.0, 0.7, 0.5])
    expected = pred + 0.3 * sig + 0.2 * vic + 0.7 * nt_xent(*out.projected_views, 0.3)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    assert trainer.term_names(len(terms) + 1)[1:] == trainer.objective.term_names
    assert len(terms) == 8


# -- what SIGReg sees --------------------------------------------------------------------------


def _pooled_by_hand(context, index, grid, levels):
    """Per level: for each image, the mean of its context tokens inside each level cell."""
    per_level = []
    for lvl in range(levels):
        s = 1 << lvl
        rows = []
        for b in range(context.shape[0]):
            cells: dict[tuple[int, int], list] = {}
            for token, pos in zip(context[b], index[b].tolist()):
                r, c = divmod(pos, grid)  # ceil pooling: every token is in cell (r//s, c//s)
                cells.setdefault((r // s, c // s), []).append(token)
            rows += [torch.stack(tokens).mean(0) for _, tokens in sorted(cells.items())]
        per_level.append(torch.stack(rows))
    return per_level


def test_regularize_on_regularises_the_claimed_tensors(tiny_config):
    trainer = Trainer(tiny_config("model.levels=3"))
    trainer.model.train()
    micro, images = next(trainer.batches())
    x, index, views = trainer.inputs(images, micro)
    out = trainer.model(x, index)
    sigreg, step = SIGReg(32), 3
    grid = trainer.model.grid_size
    by_hand = _pooled_by_hand(out.context.detach(), index.context, grid, 3)
    assert len(by_hand[0]) > len(by_hand[1]) > len(by_hand[2])  # coarser: fewer rows
    expected = {
        "context": sigreg(out.context.flatten(0, 1), step=step),
        "predictor": sum(sigreg(p.flatten(0, -2), step=step) for p in out.predictions) / 3,
        "pooled": sum(sigreg(z, step=step) for z in by_hand) / 3,
    }
    values = {}
    for where, value in expected.items():
        objective = _objective(
            "loss.regularizer=sigreg", "loss.sigreg_slices=32", f"loss.regularize_on={where}"
        )
        _, terms = objective(out, step)
        torch.testing.assert_close(terms["sigreg"], value, rtol=1e-4, atol=1e-4)
        values[where] = float(terms["sigreg"].detach())
    assert len({round(v, 3) for v in values.values()}) == 3  # three different quantities


def test_context_cells_match_the_hand_pooling():
    gen = torch.Generator().manual_seed(0)
    grid, batch, tokens = 7, 3, 20  # 7x7: level 1 and 2 have smaller edge cells
    index = torch.stack([torch.randperm(grid * grid, generator=gen)[:tokens] for _ in range(3)])
    context = torch.randn(batch, tokens, 5, generator=gen)
    by_hand = _pooled_by_hand(context, index, grid, 3)
    for lvl in range(3):
        got = context_cells(context, index, grid, lvl)
        key = lambda z: tuple(z.tolist())  # noqa: E731 -- rows in any order
        assert sorted(map(key, got.round(decimals=5))) == sorted(
            map(key, by_hand[lvl].round(decimals=5))
        )


@pytest.mark.parametrize(
    ("where", "predictor_grad"), [("context", False), ("predictor", True), ("pooled", False)]
)
def test_sigreg_gradient_reaches_only_what_it_regularises(tiny_config, where, predictor_grad):
    trainer = Trainer(tiny_config())
    trainer.model.train()
    micro, images = next(trainer.batches())
    out = trainer.model(*trainer.inputs(images, micro)[:2])
    loss = LossConfig(regularizer="sigreg", regularize_on=where, sigreg_slices=16)
    objective = Objective(loss, [0.0, 0.0, 0.0], grid_size=8)
    total, _ = objective(out, step=0)
    total.backward()
    grads = [p.grad for p in trainer.model.predictor.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads) == predictor_grad
    encoder_grad = trainer.model.context_encoder.patch_embed.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


# -- the two views -----------------------------------------------------------------------------


def test_second_view_is_another_augmentation_of_the_same_images(tiny_config):
    trainer = Trainer(tiny_config("loss.regularizer=vicreg"))
    micro, images = next(trainer.batches())
    first = trainer.inputs(images, micro)[0]
    second = trainer.inputs.second_view(images, micro)
    assert second.shape == first.shape and not torch.equal(first, second)  # independent crops
    assert torch.equal(second, trainer.inputs.second_view(images, micro))  # seeded by micro
    assert not torch.equal(second, trainer.inputs.second_view(images, micro + 1))
    # The first view, masks and drop path seeding do not depend on the second view.
    plain = Trainer(tiny_config())
    x, index, _ = plain.inputs(images, micro)
    again = trainer.inputs(images, micro)[1]
    assert torch.equal(x, first) and torch.equal(index.context, again.context)
    # Without random crops and flips both views are the very same images, row by row.
    fixed = Trainer(
        tiny_config(
            "loss.regularizer=vicreg",
            "data.crop_scale=[1, 1]",
            "data.crop_ratio=[1, 1]",
            "data.hflip=0",
        )  # fmt: skip
    )
    torch.testing.assert_close(
        fixed.inputs(images, micro)[0], fixed.inputs.second_view(images, micro)
    )


def test_pooled_views_are_the_context_token_means_under_the_same_mask(tiny_config):
    trainer = Trainer(tiny_config("loss.regularizer=vicreg", "model.drop_path=0.0"))
    trainer.model.eval()
    out, (x, index, second) = _output(trainer)
    encoder = trainer.model.context_encoder
    torch.testing.assert_close(out.pooled_views[0], encoder(x, keep=index.context).mean(1))
    torch.testing.assert_close(out.pooled_views[1], encoder(second, keep=index.context).mean(1))
    assert out.projected_views is None  # no projector without loss.contrastive


def test_two_views_need_two_images_per_micro_batch(tiny_config):
    with pytest.raises(ConfigError, match="raise train.batch_size"):
        Trainer(tiny_config("loss.contrastive=true", "train.batch_size=2", "train.accum_steps=2"))


# -- the contrastive projector: optimised, saved, resumed -------------------------------------


def test_contrastive_projector_gets_gradients_and_is_optimised(tiny_config, capture_grads):
    trainer = Trainer(tiny_config("loss.contrastive=true", "loss.regularizer=none"))
    projector = trainer.model.contrastive_projector
    assert projector in trainer.model.trainable_modules()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in projector.parameters()} <= in_optimizer
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    trainer.model.train()
    grads = capture_grads(projector)
    trainer.train_step(next(trainer.step_batches()))
    assert all(n in grads and grads[n].abs().sum() > 0 for n, _ in projector.named_parameters())
    assert not torch.equal(projector.net[0].weight, before["net.0.weight"])


def _state_with_optional(trainer):
    out = _all_state(trainer)
    state = trainer.state_dict()
    for part in trainer.model.optional_modules():
        out.update({f"{part}.{k}": v for k, v in state[part].items()})
    return out


def test_resume_with_every_regulariser_is_bit_identical(tiny_config, tmp_path):
    common = [
        "train.max_steps=4",
        "train.accum_steps=2",
        "model.drop_path=0.1",
        "run.checkpoint_every=100",
        "loss.regularizer=sigreg+vicreg",
        "loss.contrastive=true",
        "loss.sigreg_slices=64",
    ]
    full = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'full'}"))
    full.fit()
    first = Trainer(tiny_config(*common, "train.stop_after=2", f"run.dir={tmp_path / 'part'}"))
    first.fit()
    saved = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=True)
    assert (
        "contrastive_projector" in saved and "net.1.running_mean" in saved["contrastive_projector"]
    )
    resumed = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'part'}"))
    resumed.fit()
    assert resumed.step == 4
    a, b = _state_with_optional(full), _state_with_optional(resumed)
    assert a.keys() == b.keys() and any(k.startswith("contrastive_projector.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Turning the projector off for the resumed run is refused, not silently dropped.
    with pytest.raises(ConfigError, match="trained with loss.contrastive=true"):
        Trainer(
            tiny_config(*common[:-3], "loss.regularizer=sigreg", f"run.dir={tmp_path / 'part'}")
        ).fit()


# -- logging -----------------------------------------------------------------------------------


def test_every_term_is_logged_and_adds_up_to_the_loss(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.max_steps=2", *ALL_ON))
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2
    weights = trainer.objective.weights
    for r in train:
        assert set(weights) | {"loss", "loss_pred", "ema_momentum"} <= r.keys()
        assert r["loss"] == pytest.approx(sum(w * r[k] for k, w in weights.items()), rel=1e-5)
        levels = sum(w * r[f"loss_level{i}"] for i, w in enumerate([1.0, 0.7, 0.5]))
        assert r["loss_pred"] == pytest.approx(levels, rel=1e-6)


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.regularizer=barlow"], "loss.regularizer='barlow' is not one of"),
        (["loss.regularize_on=target"], "loss.regularize_on='target' is not one of"),
        (["loss.regularize_on=pooled"], "chooses what SIGReg sees"),
        (
            ["loss.regularizer=sigreg", "loss.regularize_on=pooled", "model.levels=1"],
            "no coarser level",
        ),
        (["loss.regularizer=vicreg", "loss.vicreg_weight=0"], "loss.vicreg_weight must be > 0"),
        (["loss.regularizer=sigreg", "loss.sigreg_weight=0"], "loss.sigreg_weight must be > 0"),
        (
            ["loss.regularizer=vicreg", "loss.vicreg_var_weight=0", "loss.vicreg_cov_weight=0"]
            + ["loss.vicreg_inv_weight=0"],
            "are all 0",
        ),
        (["loss.contrastive=true", "loss.contrastive_weight=0"], "contrastive_weight must be"),
        (["loss.contrastive_temperature=0"], "contrastive_temperature must be > 0"),
        (["loss.contrastive_out_dim=0"], "loss.contrastive_out_dim=0 must be >= 1"),
    ],
)
def test_bad_regulariser_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_quickstart_keeps_sigreg_and_the_none_line_turns_it_off():
    assert load_config("quickstart").loss.regularizer == "sigreg"
    assert load_config("quickstart", ["loss.regularizer=none"]).loss.regularizer == "none"


# -- collapse diagnostics ----------------------------------------------------------------------


def test_collapse_warning_names_the_collapsed_levels():
    healthy = {"collapsed_level0": False, "rank_level0": 20.0, "std_level0": 0.1}
    assert collapse_warning(5, healthy) is None
    probe = {
        **healthy,
        "collapsed_level1": True,
        "rank_level1": 1.02,
        "std_level1": 0.001,
        "knn_level1": 0.1,
    }
    line = collapse_warning(5, probe)
    assert line.startswith("WARNING: step 5: collapsed features at level1 (")
    assert "effective rank 1.02" in line and "level0" not in line and "\n" not in line


def test_probe_logs_sigreg_of_each_level_and_training_warns_on_collapse(
    tiny_config, tmp_path, capsys
):
    trainer = Trainer(tiny_config("train.max_steps=1"))  # no SIGReg in the loss
    trainer.fit()
    probe = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").open() if '"probe"' in x][-1]
    probe_data = OnlineProbe.from_config(trainer.cfg, trainer.mean, trainer.std, "cpu")
    feats, _ = encoder_features(
        trainer.model.target_encoder,
        probe_data.query,  # the held-out images the probe used
        levels=3,
        mean=trainer.mean,
        std=trainer.std,
        image_size=32,
        batch_size=64,
    )
    for lvl in range(3):
        direct = SIGReg(PROBE_SIGREG_SLICES)(feats[f"level{lvl}"], step=0)
        assert probe[f"sigreg_level{lvl}"] == pytest.approx(float(direct), rel=1e-5)
    collapsed = any(probe[f"collapsed_level{lvl}"] for lvl in range(3))
    assert ("WARNING: step 1: collapsed features" in capsys.readouterr().err) == collapsed


def test_a_collapsed_probe_prints_a_warning_during_training(tiny_config, monkeypatch, capsys):
    import hjepa.train.trainer as trainer_module

    record = {"collapsed_level0": True, "rank_level0": 1.0, "std_level0": 0.0}
    monkeypatch.setattr(trainer_module.OnlineProbe, "__call__", lambda self, encoder: dict(record))
    Trainer(tiny_config("train.max_steps=2", "train.knn_every=1")).fit()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert [line.split(":")[1] for line in err] == [" step 1", " step 2"]


def test_eval_table_still_warns_about_collapse():
    results = {
        "trained": {"level0": {"knn": 0.1, "linear": 0.1}},
        "collapse": {"level0": {"collapsed": True}, "level1": {"collapsed": False}},
    }
    assert "WARNING: collapsed features at level0" in format_table(results)
    results["collapse"]["level0"]["collapsed"] = False
    assert "WARNING" not in format_table(results)
