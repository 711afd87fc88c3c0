"""datamodules/sampling.py: the training order and each sample's augmentation are functions of (seed, epoch, index)
alone, so a resumed run (or one with other worker counts) draws the same batches; skip leaves out a resumed epoch's
first batches; the model's random state is untouched by loading."""

import torch
from hydra.utils import instantiate

from datamodules.base import AspectRatioGroupedBatchSampler
from datamodules.sampling import EpochRandomSampler, KeyedBatchSampler, SampleKey, SeededSamples, derived_seed

from ..conftest import compose


def test_the_epoch_order_is_a_function_of_seed_and_epoch():
    sampler = EpochRandomSampler(range(50), seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(EpochRandomSampler(range(50), seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and list(EpochRandomSampler(range(50), seed=4)) != first
    assert derived_seed(3, 1, 7) != derived_seed(3, 1, 8) and 0 <= derived_seed(3, 1, 7) < 2**63


def test_skip_leaves_out_the_first_batches_of_the_next_pass_only():
    batches = KeyedBatchSampler(EpochRandomSampler(range(20), seed=1), batch_size=3, drop_last=True, seed=1)
    whole = list(batches)
    assert len(whole) == 6 and all(isinstance(k, SampleKey) for b in whole for k in b)
    batches.skip = 4
    assert list(batches) == whole[4:]
    assert list(batches) == whole  # then every batch again


def test_a_keyed_sample_is_the_same_wherever_it_is_read_and_leaves_the_global_generator_alone():
    data = instantiate(compose("experiment=ssd_shapes", "data.num_train=8", "data.image_size=64").data)
    samples = SeededSamples(data.train_set)
    key = SampleKey(5, derived_seed(0, 2, 5))
    state = torch.get_rng_state()
    image, target = samples[key]
    assert torch.equal(torch.get_rng_state(), state)  # the model's dropout draws are not moved by loading
    torch.rand(100)  # other draws in between change nothing
    again, target_again = samples[key]
    assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
    # other epochs: other augmentations of image 5 (the shapes recipe only flips: some of them are flipped)
    assert any(not torch.equal(image, samples[SampleKey(5, derived_seed(0, e, 5))][0]) for e in range(3, 10))


def test_training_batches_do_not_depend_on_the_worker_count():
    overrides = ("experiment=ssd_shapes", "data.num_train=12", "data.image_size=64", "data.batch_size=4", "seed=5")
    loaders = []
    for workers in (0, 2):
        data = instantiate(compose(*overrides, f"data.num_workers={workers}").data)
        loader = data.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(1)
        loaders.append(list(loader))
    assert len(loaders[0]) == 3
    for a, b in zip(*loaders):
        assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)


def test_grouped_batches_are_keyed_and_skip_like_the_plain_ones():
    ratios = [1.5, 0.7, 1.0, 0.5, 1.33, 0.75, 2.0, 0.8, 1.2, 0.6, 1.1, 0.9]
    grouped = AspectRatioGroupedBatchSampler(EpochRandomSampler(ratios, seed=2), ratios, 2, drop_last=True, seed=2)
    grouped.sampler.set_epoch(3)
    whole = list(grouped)
    assert all(k.seed == derived_seed(2, 3, k.index) for b in whole for k in b)
    grouped.skip = 2
    assert list(grouped) == whole[2:]


def test_the_loader_state_resumes_its_epoch_at_the_next_batch():
    data = instantiate(compose("experiment=ssd_shapes", "data.num_train=16", "data.batch_size=4", "seed=1").data)
    loader = data.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(2)
    whole = [b.image_ids.tolist() for b in loader]
    resumed = data.train_dataloader()  # a new process: epoch 0, nothing skipped, until the state comes back
    resumed.load_state_dict({"epoch": 2, "batches": 3})
    assert [b.image_ids.tolist() for b in resumed] == whole[3:]
    finished = data.train_dataloader()
    finished.load_state_dict({"epoch": 2, "batches": 4})  # a checkpoint at the epoch's end: the next epoch, whole
    assert finished.batch_sampler.sampler.epoch == 3 and len(list(finished)) == 4
