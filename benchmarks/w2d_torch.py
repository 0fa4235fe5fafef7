"""What the two PyTorch peers of the W2D benchmark share: the torch model, data and weights,
the training loop around a peer's own step, and torchdiffeq sampling and likelihood.

:class:`TorchSide` is the base of ``w2d_flow_matching.FlowMatchingSide`` and
``w2d_torchcfm.TorchCFMSide``; a subclass defines ``make_step`` (its example's training
step) and may replace the solvers (``flow_matching`` uses its ``ODESolver``). torch is
imported only when a side is made, so this module imports without it.
"""

from __future__ import annotations

import math
import time

import numpy as np
from w2d_workload import SEED


def torch_checkerboard(batch_size, device="cpu"):
    """``inf_train_gen`` of Meta's flow_matching 2-D example, verbatim."""
    import torch

    x1 = torch.rand(batch_size, device=device) * 4 - 2
    x2_ = (
        torch.rand(batch_size, device=device)
        - torch.randint(high=2, size=(batch_size,), device=device) * 2
    )
    x2 = x2_ + (torch.floor(x1) % 2)
    data = 1.0 * torch.cat([x1[:, None], x2[:, None]], dim=1) / 0.45
    return data.float()


def torch_net(spec):
    """nn.Sequential Linear(3,h) act ... Linear(h,2) on concat(x, t)."""
    import torch

    act = {"silu": torch.nn.SiLU, "selu": torch.nn.SELU}[spec["activation"]]
    h, depth = spec["hidden"], spec["depth"]
    layers = [torch.nn.Linear(3, h), act()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(h, h), act()]
    layers += [torch.nn.Linear(h, 2)]
    return torch.nn.Sequential(*layers)


def torch_gaussian_log_prob(x):
    import torch

    return -0.5 * torch.sum(x * x, dim=1) - x.shape[1] * 0.5 * math.log(2 * math.pi)


def torch_cat_xt(torch, x, t):
    """concat(x, t) with t a scalar tensor (ODE solvers) or (B,) (training)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    if t.ndim == 0:
        t = t.repeat(x.shape[0])
    return torch.cat([x, t[:, None]], dim=-1)


def torch_linears(net):
    import torch

    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


def torch_to_layers(net):
    return [
        (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
        for m in torch_linears(net)
    ]


def layers_to_torch(net, layers):
    import torch

    lins = torch_linears(net)
    if len(lins) != len(layers):
        raise ValueError(f"torch model has {len(lins)} Linear layers, weights {len(layers)}")
    with torch.no_grad():
        for m, (k, b) in zip(lins, layers, strict=True):
            m.weight.copy_(torch.from_numpy(np.array(k.T, np.float32)))
            m.bias.copy_(torch.from_numpy(np.array(b, np.float32)))


class TorchSide:
    """Shared torch plumbing; subclasses define the model call, training loop and solvers."""

    name = "torch"

    def __init__(self, spec):
        import torch
        import torchdiffeq

        self.torch, self.torchdiffeq = torch, torchdiffeq
        self.spec = spec
        self.nfe = 0

    def new_net(self, seed):
        self.torch.manual_seed(seed)
        return self.make_net()

    def make_net(self):
        return torch_net(self.spec)

    def make_step(self, net, opt, batch):
        """``step()``: one training step of the peer's own example loop; returns the loss."""
        raise NotImplementedError

    def params_from_layers(self, layers):
        net = self.new_net(0)
        layers_to_torch(net, layers)
        net.eval()
        return net

    def to_layers(self, net):
        return torch_to_layers(net)

    def new_trainer(self, batch, seed):
        net = self.new_net(seed)
        opt = self.torch.optim.Adam(net.parameters(), lr=1e-3)
        return net, self.make_step(net, opt, batch)

    def train_timer(self, batch, steps, seed=SEED):
        """``(None, run)``: ``run()`` makes ``steps`` steps of the peer's own loop and
        returns the last loss; two untimed warm-up steps are made here."""
        _, step = self.new_trainer(batch, seed)

        def run_n(n):
            for _ in range(n):
                loss = step()
            return float(loss)

        run_n(2)
        return None, lambda: run_n(steps)

    def train(self, batch, steps, seed=SEED):
        net, step = self.new_trainer(batch, seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        dt = time.perf_counter() - t0
        net.eval()
        return net, {"train_s": dt, "steps_per_s": steps / dt, "final_loss": float(loss)}

    # generic torchdiffeq plumbing (the torchcfm way; flow_matching overrides with ODESolver)
    def velocity(self, net, t, x):
        self.nfe += 1
        return net(torch_cat_xt(self.torch, x, t))

    def odeint_kwargs(self, solver, step_size, steps, tol):
        if solver == "dopri5":
            return {"method": "dopri5", "rtol": tol, "atol": tol}
        if steps is not None:
            step_size = 1.0 / steps
        return {"method": solver, "options": {"step_size": step_size}}

    def sample(self, net, x0, solver, step_size=None, steps=None, tol=1e-5):
        torch = self.torch
        self.nfe = 0
        x0 = torch.as_tensor(np.asarray(x0))
        t_span = torch.tensor([0.0, 1.0])
        with torch.no_grad():
            traj = self.torchdiffeq.odeint(
                lambda t, x: self.velocity(net, t, x),
                x0,
                t_span,
                **self.odeint_kwargs(solver, step_size, steps, tol),
            )
        return traj[-1], self.nfe

    def log_likelihood(self, net, x1, divergence, solver, step_size=None, tol=1e-5, seed=SEED):
        """torchdiffeq on [x, delta_logp] from t=1 to t=0; divergence by autograd."""
        torch = self.torch
        self.nfe = 0
        x1 = torch.as_tensor(np.asarray(x1))
        torch.manual_seed(seed)
        z = (torch.randn_like(x1) < 0) * 2.0 - 1.0  # Rademacher probe, fixed over the solve
        exact = divergence == "exact"

        def aug(t, state):
            x = state[0]
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.velocity(net, t, x)
                if exact:
                    div = torch.zeros(x.shape[0])
                    d = x.shape[1]
                    for i in range(d):
                        g = torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < d - 1)[0]
                        div = div + g[:, i]
                else:
                    g = torch.autograd.grad((v * z).sum(), x)[0]
                    div = (g * z).sum(dim=1)
            return v.detach(), div.detach()

        state0 = (x1, torch.zeros(x1.shape[0]))
        with torch.no_grad():
            xs, deltas = self.torchdiffeq.odeint(
                aug,
                state0,
                torch.tensor([1.0, 0.0]),
                **self.odeint_kwargs(solver, step_size, None, tol),
            )
        logp = torch_gaussian_log_prob(xs[-1]) + deltas[-1]
        return logp, self.nfe
