"""The post-hoc probe, the decorrelation figure that counts: it trains until
its held-out loss stops falling, and without a held-out share it is the
fixed-epoch probe that earlier results were read with."""
import math

import torch
import torch.nn.functional as F

from daae.config import EvalConfig
from daae.evaluate import train_probe
from daae.models import Critic


def _class_on_rings(n, seed=0):
    """The class as the radius of a 2-d code: present, but only slowly
    learned by an MLP started small, so a short probe under-reads it."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    radius = 1 + labels.float() + 0.15 * torch.randn(n, generator=generator)
    z = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    return z, labels


def _probe(config, z, labels):
    torch.manual_seed(0)
    probe = train_probe(Critic(2, 10, config.probe_hidden), z[:3000], labels[:3000], config, seed=0)
    with torch.no_grad():
        return float((probe(z[3000:]).argmax(1) == labels[3000:]).float().mean())


def test_a_probe_trained_to_its_held_out_best_reads_what_a_short_one_misses():
    z, labels = _class_on_rings(4000)
    short = _probe(EvalConfig(probe_hidden=32, probe_epochs=1, probe_patience=0), z, labels)
    stopped = _probe(EvalConfig(probe_hidden=32, probe_epochs=100), z, labels)
    long = _probe(EvalConfig(probe_hidden=32, probe_epochs=100, probe_patience=0,
                             probe_holdout=0), z, labels)
    assert stopped > short + 0.2, (short, stopped)
    assert stopped > long - 0.05, (stopped, long)


class _CountingCritic(Critic):
    batches = 0

    def forward(self, x):
        if self.training:
            type(self).batches += 1
        return super().forward(x)


def test_a_probe_on_codes_without_the_class_stops_after_its_patience():
    generator = torch.Generator().manual_seed(0)
    z, labels = torch.randn(1000, 3, generator=generator), torch.randint(10, (1000,), generator=generator)
    config = EvalConfig(probe_hidden=16, probe_epochs=100, probe_patience=2, probe_batch_size=100)
    probe = train_probe(_CountingCritic(3, 10, 16), z, labels, config, seed=0)
    epochs = _CountingCritic.batches / 9  # 900 codes fit, 100 held out
    assert 3 <= epochs < 30, epochs
    assert not probe.training


def test_without_a_held_out_share_it_is_the_fixed_epoch_probe_of_earlier_results():
    z, labels = _class_on_rings(600)
    config = EvalConfig(probe_hidden=16, probe_epochs=3, probe_patience=0, probe_holdout=0,
                        probe_batch_size=64)
    torch.manual_seed(1)
    probe = train_probe(Critic(2, 10, 16), z, labels, config, seed=5)

    # The loop daae shipped before the probe stopped on its held-out loss.
    torch.manual_seed(1)
    earlier = Critic(2, 10, 16)
    generator = torch.Generator().manual_seed(5)
    optimizer = torch.optim.Adam(earlier.parameters(), lr=config.probe_lr)
    for _ in range(config.probe_epochs):
        order = torch.randperm(len(z), generator=generator)
        for start in range(0, len(z), config.probe_batch_size):
            index = order[start:start + config.probe_batch_size]
            loss = F.cross_entropy(earlier(z[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for mine, theirs in zip(probe.state_dict().values(), earlier.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_a_probe_whose_loss_diverges_is_an_error_not_a_chance_reading():
    import pytest

    from daae.config import ConfigError

    z, labels = _class_on_rings(4000)
    with pytest.raises(ConfigError, match=r"probe's training loss became non-finite: lower eval\.probe_lr"):
        _probe(EvalConfig(probe_hidden=32, probe_epochs=3, probe_lr=1e30), z, labels)

