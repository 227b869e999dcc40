"""A straightforward port of the original six-phase algorithm, the baseline that
bench_step compares daae against: DataLoader batches copied to the device each
step, one forward per phase, a separate Adam per phase, losses read with
.item() every step (as the original logs them). Same networks as daae."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from daae.models import Networks


class ReferenceTrainer:
    def __init__(self, nets: Networks, unlabelled: torch.Tensor, labelled: torch.Tensor,
                 labels: torch.Tensor, device, batch_size: int = 100, lr: float = 3e-4,
                 noise: float = 0.3, decorrelation: float = 0.5, autocast_dtype=None):
        self.nets, self.device, self.noise = nets, device, noise
        self.decorrelation = decorrelation
        self.autocast_dtype = autocast_dtype
        e, d = nets.encoder, nets.decoder
        adam = lambda params, scale=1.0: torch.optim.Adam(params, lr=lr * scale)
        self.opt_rec = adam([*e.parameters(), *d.parameters()])
        self.opt_disc = adam([*nets.d_z.parameters(), *nets.d_y.parameters()])
        self.opt_gen_z = adam(e.z_branch_parameters())
        self.opt_gen_y = adam(e.y_branch_parameters())
        self.opt_sup = adam(e.y_branch_parameters())
        self.opt_corr = adam(nets.correlation.parameters())
        self.opt_dec = adam(e.z_branch_parameters(), decorrelation)
        self.unlabelled = itertools.cycle(DataLoader(TensorDataset(unlabelled), batch_size=batch_size,
                                                     shuffle=True, drop_last=True))
        self.labelled = itertools.cycle(DataLoader(TensorDataset(labelled, labels),
                                                   batch_size=batch_size, shuffle=True))
        self.num_classes = nets.correlation.net[-1].out_features
        self.z_dim = nets.d_z.net[0].in_features

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def step(self) -> dict[str, float]:
        nets, dev = self.nets, self.device
        (x,) = next(self.unlabelled)
        x_l, y_l = next(self.labelled)
        x, x_l, y_l = x.to(dev), x_l.to(dev), y_l.to(dev)
        noisy = lambda t: t + self.noise * torch.randn_like(t)
        losses = {}
        with self._autocast():
            # 1. reconstruction
            ly, z = nets.encoder(noisy(x))
            rec = F.mse_loss(nets.decoder(ly.softmax(1), z).float(), x)
        self.opt_rec.zero_grad(); rec.backward(); self.opt_rec.step()
        losses["rec"] = rec.item()
        with self._autocast():
            # 2. discriminators
            with torch.no_grad():
                ly, z = nets.encoder(noisy(x))
            prior_z = torch.randn(len(x), self.z_dim, device=dev)
            prior_y = F.one_hot(torch.randint(self.num_classes, (len(x),), device=dev),
                                self.num_classes).float()
            ones, zeros = torch.ones(len(x), 1, device=dev), torch.zeros(len(x), 1, device=dev)
            bce = F.binary_cross_entropy_with_logits
            d_loss = (bce(nets.d_z(prior_z).float(), ones) + bce(nets.d_z(z).float(), zeros)
                      + bce(nets.d_y(prior_y).float(), ones)
                      + bce(nets.d_y(ly.float().softmax(1)).float(), zeros))
        self.opt_disc.zero_grad(); d_loss.backward(); self.opt_disc.step()
        losses["disc"] = d_loss.item()
        with self._autocast():
            # 3. regularisation: z branch, then y branch
            _, z = nets.encoder(noisy(x))
            g_z = bce(nets.d_z(z).float(), ones)
        self.opt_gen_z.zero_grad(); g_z.backward(); self.opt_gen_z.step()
        with self._autocast():
            ly, _ = nets.encoder(noisy(x))
            g_y = bce(nets.d_y(ly.float().softmax(1)).float(), ones)
        self.opt_gen_y.zero_grad(); g_y.backward(); self.opt_gen_y.step()
        losses["gen"] = g_z.item() + g_y.item()
        with self._autocast():
            # 4. supervised
            ly, _ = nets.encoder(noisy(x_l))
            sup = F.cross_entropy(ly.float(), y_l)
        self.opt_sup.zero_grad(); sup.backward(); self.opt_sup.step()
        losses["sup"] = sup.item()
        with self._autocast():
            # 5. correlation classifier
            with torch.no_grad():
                ly, z = nets.encoder(noisy(x))
            corr = F.cross_entropy(nets.correlation(z).float(), ly.float().softmax(1))
        self.opt_corr.zero_grad(); corr.backward(); self.opt_corr.step()
        losses["corr"] = corr.item()
        with self._autocast():
            # 6. decorrelation (maximise C's cross-entropy)
            ly, z = nets.encoder(noisy(x))
            dec = -F.cross_entropy(nets.correlation(z).float(), ly.detach().float().softmax(1))
        self.opt_dec.zero_grad(); (self.decorrelation * dec).backward(); self.opt_dec.step()
        losses["dec"] = dec.item()
        return losses
