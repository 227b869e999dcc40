"""The independence term's measure: what it reads as dependence, and that
descending it takes the class out of z for a classifier trained afterwards."""
import torch
import torch.nn.functional as F

from daae.dependence import class_rows, normalised_hsic
from daae.evaluate import probe_accuracies
from daae.config import EvalConfig


def _styles_and_classes(n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=generator)
    z = torch.randn(n, 4, generator=generator)
    return z, labels


def test_it_is_near_zero_for_independent_z_and_high_when_z_encodes_the_class():
    z, labels = _styles_and_classes()
    classes = F.one_hot(labels, 10).float()
    independent = normalised_hsic(z, classes)
    # The class in z not as a shift of the mean but as a radius: a linear
    # probe cannot read it, a kernel measure must.
    radius = (labels.float() + 1)[:, None] * z / z.norm(dim=1, keepdim=True)
    assert independent < 0.06
    assert normalised_hsic(radius, classes) > 4 * independent
    assert normalised_hsic(z + 3 * classes[:, :4], classes) > 4 * independent


def test_rescaling_z_leaves_it_unchanged_and_the_classes_get_no_gradient():
    z, labels = _styles_and_classes()
    classes = F.one_hot(labels, 10).float().requires_grad_()
    z = (z + classes[:, :4].detach()).requires_grad_()
    value = normalised_hsic(z, classes)
    torch.testing.assert_close(normalised_hsic(7.5 * z, classes), value)
    value.backward()
    assert z.grad.abs().sum() > 0 and classes.grad is None


def test_hard_targets_become_one_hot_rows_and_soft_ones_stay():
    torch.testing.assert_close(class_rows(torch.tensor([2, 0]), 3),
                               torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    soft = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert torch.equal(class_rows(soft, 2), soft)


def test_descending_it_in_batches_leaves_z_that_a_fresh_probe_cannot_read():
    z, labels = _styles_and_classes(n=2000)
    z = (z + 2.5 * F.one_hot(labels, 10).float()[:, :4]).requires_grad_()
    classes = F.one_hot(labels, 10).float()
    config = EvalConfig(probe_hidden=64, probe_epochs=10, probe_lr=3e-3)

    def probe_accuracy():
        fresh = z.detach()
        return probe_accuracies(fresh[:1500], labels[:1500], fresh[1500:], labels[1500:],
                                10, config, seed=0)["probe_accuracy"]

    before = probe_accuracy()
    optimizer = torch.optim.Adam([z], lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        batch = torch.randperm(2000, generator=generator)[:100]
        optimizer.zero_grad()
        normalised_hsic(z[batch], classes[batch]).backward()
        optimizer.step()
    after = probe_accuracy()
    assert before > 0.3
    assert after < 0.2, (before, after)
