"""model.channels_last=auto: the faster layout is kept, the probe leaves the model as it was, the answer is cached."""

import json
import random

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from engine import layout
from engine.memory import probe_batch

from ..conftest import DEVICES, TINY, compose, quiet_trainer


def tiny(*overrides):
    cfg = compose(*TINY, "model.channels_last=auto", *overrides)
    data = instantiate(cfg.data)
    data.setup("fit")
    return instantiate(cfg.model), data, cfg


def is_nhwc(model) -> bool:
    weight = (
        model.backbone.body.conv1.weight
        if hasattr(model.backbone, "body")
        else next(p for p in model.parameters() if p.dim() == 4)
    )
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


@pytest.mark.parametrize("nhwc_seconds, expected, rounds", [(1.0, True, 1), (3.0, False, 1), (1.8, True, 2)])
def test_the_faster_layout_is_kept_and_the_model_left_untouched(nhwc_seconds, expected, rounds):
    module, data, _ = tiny()
    model = module.net
    assert model.channels_last is False and module.channels_last_auto  # NCHW until measured
    before = {k: v.clone() for k, v in model.state_dict().items()}
    now = [0.0]

    def clock():  # a step costs nhwc_seconds channels-last, 2 s NCHW; each reading advances by that
        now[0] += nhwc_seconds if model.channels_last else 2.0
        readings.append(now[0])
        return now[0]

    readings = []

    batch = probe_batch(data.train_set, 2, (64, 64))
    seconds = layout.time_layouts(model, batch, model.use_channels_last, clock=clock)
    assert seconds == {True: pytest.approx(nhwc_seconds), False: pytest.approx(2.0)}
    # the clock is read once a warm-up step, twice a timed one: a clear gap settles in one timed round, 10 % in two
    assert len(readings) == 2 + 4 * rounds
    chosen = seconds[True] < seconds[False]
    assert chosen is expected
    for key, value in model.state_dict().items():  # BatchNorm statistics moved during the probe steps: restored
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None for p in model.parameters())


def test_choice_is_cached_per_machine_and_config_and_a_damaged_cache_is_remeasured(tmp_path, monkeypatch):
    module, data, cfg = tiny()
    model = module.net
    cache = tmp_path / "memory_format.json"
    calls = []

    def measured(model, batch, set_layout, autocast=None):
        calls.append(tuple(batch.images.shape))
        return {True: 0.5, False: 1.0}

    monkeypatch.setattr(layout, "time_layouts", measured)
    args = (model, data.train_set, data.train_transform, data.size_divisible)
    kwargs = dict(batch_size=8, device=torch.device("cpu"), cache=cache)
    rng = torch.get_rng_state(), random.getstate()
    assert layout.choose_channels_last(*args, model_config={"a": 1}, **kwargs) is True
    # the probe's samples were augmented (random flips) without moving the run's random streams
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert calls == [(8, 3, 64, 64)] and model.channels_last and is_nhwc(model)  # left in the chosen layout
    (entry,) = json.loads(cache.read_text()).items()
    assert "threads=" in entry[0] and torch.__version__ in entry[0] and entry[1]["channels_last"] is True

    model.use_channels_last(False)
    assert layout.choose_channels_last(*args, model_config={"a": 1}, **kwargs) is True  # from the cache
    assert len(calls) == 1 and model.channels_last and is_nhwc(model)
    layout.choose_channels_last(*args, model_config={"a": 2}, **kwargs)  # another model: measured
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2

    cache.write_text("{not json")
    layout.choose_channels_last(*args, model_config={"a": 1}, **kwargs)
    assert len(calls) == 3 and len(json.loads(cache.read_text())) == 1


def test_a_large_input_is_probed_on_fewer_images():
    model, data, _ = tiny("data.image_size=1024")
    shape = layout.largest_input(data.train_transform, data.train_set, data.size_divisible)
    assert shape == (1024, 1024)
    assert max(1, min(8, layout.PROBE_PIXELS // (shape[0] * shape[1]))) == 1


def test_a_wrong_value_names_the_key_and_the_choices():
    with pytest.raises(InstantiationException, match=r"model.channels_last='yes'.*true.*false.*auto"):
        tiny("model.channels_last=yes")


@pytest.mark.parametrize("global_zero", [True, False])
def test_every_rank_takes_rank_zeros_choice(monkeypatch, global_zero):
    """Only global rank 0 measures; what it broadcasts is every rank's layout (two ranks measuring a tie apart
    would hold parameters of different strides, which DDP refuses)."""
    from types import SimpleNamespace

    model, data, _ = tiny()
    measured = []
    monkeypatch.setattr(layout, "choose_channels_last", lambda *args, **kwargs: measured.append(args) or False)
    sent = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return True  # rank 0's answer, whatever this rank holds

    trainer = SimpleNamespace(
        is_global_zero=global_zero,
        datamodule=data,
        strategy=SimpleNamespace(root_device=torch.device("cpu"), broadcast=broadcast),
        precision_plugin=SimpleNamespace(forward_context=None),
    )
    callback = layout.ChannelsLastAuto(batch_size=8, model_config={"a": 1})
    callback.setup(trainer, model, "validate")
    assert not sent and not model.net.channels_last  # fitting only
    callback.setup(trainer, model, "fit")
    assert len(measured) == int(global_zero) and sent == [False if global_zero else None]
    assert model.net.channels_last and is_nhwc(model.net)


@pytest.mark.parametrize("device", DEVICES)
def test_a_trainer_on_the_device_measures_there_at_setup_and_trains(device, tmp_path, monkeypatch):
    """The callback in a real fit: at Lightning's setup the model is still on the CPU and the strategy moves it
    after, so the probe takes it to the training device and back (a batch on the GPU beside weights on the CPU
    stopped every `train.py trainer.accelerator=gpu` run before its first step)."""
    monkeypatch.setattr(layout, "cache_file", lambda: tmp_path / "layouts.json")
    module, data, cfg = tiny()
    probed_on = []
    real = layout.time_layouts
    monkeypatch.setattr(
        layout,
        "time_layouts",
        lambda model, batch, *a, **k: (
            probed_on.append({next(model.parameters()).device.type, batch.images.device.type})
            or real(model, batch, *a, **k)
        ),
    )
    trainer = quiet_trainer(
        tmp_path, device, max_steps=2, callbacks=[layout.ChannelsLastAuto(8, {"test": device})], limit_train_batches=2
    )
    trainer.fit(module, datamodule=data)
    assert probed_on == [{device}] and trainer.global_step == 2
    assert module.net.channels_last == json.loads((tmp_path / "layouts.json").read_text()).popitem()[1]["channels_last"]
