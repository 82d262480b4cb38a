"""The eager pieces a compiled step is made of: SIGReg's directions drawn before the loss, and
the AdamW update with tensor learning rate and weight decay that skips on a device flag."""

import copy

import pytest
import torch

from hjepa.config import OptimConfig
from hjepa.losses.sigreg import SIGReg
from hjepa.train.optim import adamw_groups, adamw_step_where, build_optimizer, set_schedule
from hjepa.train.trainer import Trainer
from tests.test_objective import _output


@pytest.mark.parametrize("draw", ["gaussian", "permuted"])
def test_a_drawn_projection_gives_the_steps_value_bit_for_bit(draw):
    sigreg = SIGReg(64, draw=draw)
    z = torch.randn(50, 12)
    drawn = SIGReg(64, draw=draw).draw_at(7, 12, torch.float32, torch.device("cpu"))
    assert torch.equal(sigreg(z, drawn=drawn), sigreg(z, step=7))
    assert not torch.equal(sigreg(z, drawn=drawn), sigreg(z, step=8))


def test_a_draw_of_the_wrong_width_or_kind_is_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="draw_at"):
        SIGReg(8)(torch.randn(10, 12), drawn=SIGReg(8).draw_at(0, 6, torch.float32, cpu))
    permuted = SIGReg(8, draw="permuted").draw_at(0, 12, torch.float32, cpu)
    with pytest.raises(ValueError, match="draw_at"):
        SIGReg(8)(torch.randn(10, 12), drawn=permuted)


def test_the_objective_with_a_steps_draws_equals_the_objective_at_that_step(tiny_config):
    trainer = Trainer(tiny_config("loss.regularizer=sigreg", "loss.regularize_on=predictor"))
    objective, out = trainer.objective, _output(trainer)[0]
    dim = out.context.shape[-1]
    draws = objective.draws(3, dim, torch.float32, torch.device("cpu"))
    total, terms = objective(out, draws=draws)
    want_total, want_terms = objective(out, step=3)
    assert torch.equal(total, want_total) and terms.keys() == want_terms.keys()
    assert all(torch.equal(terms[k], want_terms[k]) for k in terms)
    with pytest.raises(ValueError, match="exactly one"):
        objective(out, step=3, draws=draws)


def _optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    return model, build_optimizer([model], OptimConfig())


def _grads(model, step: int) -> None:
    torch.manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def test_adamw_step_where_follows_torchs_adamw_and_a_skip_changes_nothing():
    ours, ours_opt = _optimizer()
    torch_model, torch_opt = _optimizer()
    schedule = [(1e-2, 0.05), (5e-3, 0.1), (2e-3, 0.2)]
    for step, (lr, wd) in enumerate(schedule):
        _grads(ours, step)
        _grads(torch_model, step)
        set_schedule(torch_opt, lr, wd)
        torch_opt.step()
        applied = torch.tensor(True)
        lr_t, wd_t = torch.tensor(lr, dtype=torch.float64), torch.tensor(wd, dtype=torch.float64)
        adamw_step_where(adamw_groups(ours_opt), lr_t, wd_t, applied)
    for mine, theirs in zip(ours.parameters(), torch_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    state, params = copy.deepcopy(ours_opt.state_dict()["state"]), copy.deepcopy(ours.state_dict())
    _grads(ours, 9)
    groups = adamw_groups(ours_opt)
    adamw_step_where(groups, torch.tensor(1e-2), torch.tensor(0.05), torch.tensor(False))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, params[key]), key
    for index, moments in ours_opt.state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, state[index][name]), (index, name)
    assert float(state[0]["step"]) == len(schedule)
