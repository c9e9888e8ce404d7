"""The Dice term must carry gradient (the reference code's thresholded Dice did not)."""

import pytest
import torch

from mvl_pipeline.training.losses import make_loss, prepare_target


def thresholded_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference code's mistake: Dice on hard predictions (argmax) has no gradient."""
    prediction = logits.argmax(dim=1)
    inter = ((prediction == 1) & (target == 1)).sum().float()
    return 1 - 2 * inter / ((prediction == 1).sum() + (target == 1).sum()).clamp(min=1).float()


def gradient_reaching_the_logits(loss_fn, num_classes: int) -> float:
    """The check both tests below make: the summed |gradient| that ``loss_fn`` sends back to
    the logits (0.0 when none reaches them)."""
    torch.manual_seed(0)
    logits = torch.randn(2, num_classes, 8, 8, 4, requires_grad=True)
    target = torch.randint(0, max(2, num_classes), (2, 8, 8, 4))
    loss = loss_fn(logits, target)
    if not loss.requires_grad:
        return 0.0
    loss.backward()
    return float(logits.grad.abs().sum())


@pytest.mark.parametrize("num_classes", [1, 2, 3])
def test_dice_term_alone_has_gradient(num_classes):
    dice_only = make_loss(num_classes, lambda_dice=1.0, lambda_ce=0.0)
    assert gradient_reaching_the_logits(lambda lg, t: dice_only(lg, prepare_target(t, num_classes)), num_classes) > 1e-6


def test_the_reference_codes_thresholded_dice_would_fail_this_check():
    # the same check on the reference code's loss: argmax cuts the graph, no gradient reaches the logits
    assert gradient_reaching_the_logits(thresholded_dice_loss, 2) == 0.0


def test_loss_decreases_when_logits_move_towards_the_target():
    target = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    target[:, 2:6, 2:6, 1:3] = 1
    onehot = torch.nn.functional.one_hot(target, 2).permute(0, 4, 1, 2, 3).float()
    loss_fn = make_loss(2)
    wrong = loss_fn(-4 * onehot, prepare_target(target, 2))
    right = loss_fn(4 * onehot, prepare_target(target, 2))
    assert float(right) < float(wrong)
