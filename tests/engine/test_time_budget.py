"""callbacks.time_budget: a run whose planned steps would not fit stops within the budget, its whole learning-rate
schedule compressed onto the steps it has; a run that fits is left as planned."""

import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from engine.callbacks import TimeBudget
from engine.detection_module import warmup_multistep

STEP_SECONDS = 0.04
SCHEDULE = dict(warmup_steps=5, warmup_factor=0.1, milestones=[60, 80], gamma=0.1)  # of 100 planned steps


class SlowModule(L.LightningModule):
    """A step that takes STEP_SECONDS (sleeping, so the CPU's load does not change it) and records its lr."""

    def __init__(self, val_seconds: float = STEP_SECONDS, schedule: dict = SCHEDULE) -> None:
        super().__init__()
        self.val_seconds, self.schedule = val_seconds, schedule
        self.layer = torch.nn.Linear(2, 1)
        self.lrs: list[float] = []
        self.validations: list[int] = []  # the step of each validation

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_SECONDS)
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_seconds)
        self.validations.append(self.trainer.global_step)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_multistep(**self.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(minutes, by_steps=False, val_seconds=STEP_SECONDS, val_share=1.0, schedule=SCHEDULE):
    """100 planned steps: 10 epochs of 10 steps, validated each epoch; or (``by_steps``, as the CPU recipes plan)
    max_steps=100 with a validation every 10 steps across epochs."""
    data = DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=1)
    budget = TimeBudget(minutes, check_after_steps=5, val_share=val_share, keep_steps=schedule["warmup_steps"])
    plan = (
        dict(max_steps=100, max_epochs=-1, check_val_every_n_epoch=None, val_check_interval=10)
        if by_steps
        else dict(max_epochs=10)
    )
    trainer = L.Trainer(
        **plan,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[budget],
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    module = SlowModule(val_seconds, schedule)
    start = time.monotonic()
    trainer.fit(module, data, data)
    return module, budget, time.monotonic() - start


@pytest.mark.parametrize("by_steps", [False, True])
def test_a_plan_that_does_not_fit_is_cut_and_ends_on_the_decayed_rates(by_steps):
    # 100 planned steps take ≥ 4 s plus 10 validations; the budget allows ~2 s
    module, budget, seconds = fit(minutes=2.0 / 60, by_steps=by_steps)
    steps = len(module.lrs)
    assert 10 < steps < 60, steps
    assert seconds < 2.0 + 1.5  # a validation and Lightning's start/stop on top of the planned 2 s
    assert budget.total_steps == steps and budget.cuts
    planned = warmup_multistep(**SCHEDULE)
    assert module.lrs[-1] == pytest.approx(planned(99), rel=1e-6)  # both decays reached
    assert module.lrs[: budget.cuts[0][0]] == pytest.approx([planned(s) for s in range(budget.cuts[0][0])])
    after = module.lrs[budget.cuts[0][0] :]
    assert all(b <= a for a, b in zip(after, after[1:]))  # past the warm-up, only decays
    if by_steps:  # the plan's 10 validations, every 10 planned steps: closer together in trained steps
        assert 8 <= len(module.validations) <= 12, module.validations  # + the last step's, + one as it changes


def test_the_warm_up_runs_as_planned_and_the_steps_after_carry_the_cut():
    """The budget is measured at step 7, inside a 30-step warm-up: the warm-up's steps run at their planned rates,
    one planned step each, the cut starts at step 30 and the run still ends on the decayed rates within budget."""
    schedule = {**SCHEDULE, "warmup_steps": 30}
    module, budget, seconds = fit(minutes=2.5 / 60, by_steps=True, schedule=schedule)
    planned = warmup_multistep(**schedule)
    assert budget.cuts[0][0] == 30 and budget.cuts[0][1] > 1.5, budget.cuts
    assert module.lrs[:30] == pytest.approx([planned(s) for s in range(30)])  # not squeezed
    assert module.lrs[-1] == pytest.approx(planned(99), rel=1e-6) and 30 < len(module.lrs) < 70
    assert seconds < 2.5 + 1.5


def test_a_plan_that_fits_is_left_as_it_is():
    module, budget, _ = fit(minutes=1.0)
    planned = warmup_multistep(**SCHEDULE)
    assert not budget.cuts and len(module.lrs) == 100
    assert module.lrs == pytest.approx([planned(s) for s in range(100)])


def test_slow_validations_come_further_apart_within_their_share():
    # a validation costs 0.2 s, 5 steps; the plan's 10 would take all of the 2 s budget; a tenth of it allows 1
    module, budget, seconds = fit(minutes=2.0 / 60, by_steps=True, val_seconds=0.2, val_share=0.1)
    assert len(module.validations) <= 3, module.validations  # the first (measured), the one allowed, the last
    assert budget.val_every is not None and seconds < 2.0 + 1.5
    planned = warmup_multistep(**SCHEDULE)
    assert module.lrs[-1] == pytest.approx(planned(99), rel=1e-6)  # still the whole schedule
    with pytest.raises(ValueError, match="val_share"):
        TimeBudget(1.0, val_share=0)


def test_schedule_steps_follow_each_cut():
    budget = TimeBudget(1.0)
    budget.cuts = [(10, 2.0), (20, 4.0)]  # from step 10 each step covers 2 planned steps, from step 20 four
    assert [budget.schedule_step(s) for s in (5, 10, 15, 20, 25)] == [5, 10, 20, 30, 50]
