from __future__ import annotations

import pytest
import torch

from pipeline.data.mix import mix_batch


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.full((3, 20, 20), float(i)) for i in range(4)])  # image i is all i
    return images, torch.tensor([0, 1, 2, 3])


def test_off_means_one_hot_targets_and_untouched_images() -> None:
    images, labels = _batch()
    mixed, targets = mix_batch(images, labels, num_classes=5)
    assert mixed is images
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 5).float())


def test_mixup_blends_each_image_with_the_previous_one_by_the_target_weight() -> None:
    torch.manual_seed(0)
    images, labels = _batch()
    mixed, targets = mix_batch(images, labels, num_classes=4, mixup_alpha=0.4)
    lam = targets[1, 1].item()  # sample 1 keeps lam of class 1 and takes 1 - lam of class 0
    assert 0 < lam < 1
    assert targets[1, 0].item() == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed[1], lam * images[1] + (1 - lam) * images[0])
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))


def test_cutmix_targets_match_the_pasted_area() -> None:
    torch.manual_seed(3)
    images, labels = _batch()
    for _ in range(20):
        mixed, targets = mix_batch(images, labels, num_classes=4, cutmix_alpha=1.0)
        # the share of pixels that came from the previous image is the weight of its class
        from_previous = (mixed[2] == images[1]).float().mean().item()
        assert targets[2, 1].item() == pytest.approx(from_previous)
        assert targets[2, 2].item() == pytest.approx(1 - from_previous)


def test_the_draws_follow_torchs_rng_so_a_restored_rng_repeats_them() -> None:
    images, labels = _batch()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = mix_batch(images, labels, num_classes=4, mixup_alpha=0.2, cutmix_alpha=1.0)
    torch.set_rng_state(state)
    again = mix_batch(images, labels, num_classes=4, mixup_alpha=0.2, cutmix_alpha=1.0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
