"""The side of Meta's ``flow_matching`` in the W2D benchmark.

``AffineProbPath(CondOTScheduler())`` and the training loop of the library's 2-D example;
sampling and likelihood through its ``ODESolver`` (``sample``, ``compute_likelihood``), the
model wrapped in a ``ModelWrapper`` that counts its forward calls (the true NFE).
"""

from __future__ import annotations

import numpy as np
from w2d_torch import TorchSide, torch_cat_xt, torch_checkerboard, torch_gaussian_log_prob
from w2d_workload import SEED


class FlowMatchingSide(TorchSide):
    """Meta's flow_matching: AffineProbPath(CondOTScheduler()) + ODESolver."""

    name = "flow_matching"

    def __init__(self, spec):
        super().__init__(spec)
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.ODESolver = ODESolver
        side = self

        class CountingWrapper(ModelWrapper):
            """The example's WrappedModel, counting forward calls (true NFE)."""

            def forward(self, x, t, **extras):
                side.nfe += 1
                return self.model(torch_cat_xt(side.torch, x, t))

        self.Wrapper = CountingWrapper

    def make_step(self, net, opt, batch):
        torch, path = self.torch, self.path

        def step():  # the training loop of the flow_matching 2-D example
            opt.zero_grad()
            x_1 = torch_checkerboard(batch)
            x_0 = torch.randn_like(x_1)
            t = torch.rand(x_1.shape[0])
            path_sample = path.sample(t=t, x_0=x_0, x_1=x_1)
            pred = net(torch_cat_xt(torch, path_sample.x_t, path_sample.t))
            loss = torch.pow(pred - path_sample.dx_t, 2).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    def sample(self, net, x0, solver, step_size=None, steps=None, tol=1e-5):
        torch = self.torch
        self.nfe = 0
        solver_obj = self.ODESolver(velocity_model=self.Wrapper(net))
        x0 = torch.as_tensor(np.asarray(x0))
        if solver == "dopri5":
            x = solver_obj.sample(x_init=x0, step_size=None, method="dopri5", atol=tol, rtol=tol)
        else:
            if steps is not None:
                step_size = 1.0 / steps
            x = solver_obj.sample(x_init=x0, step_size=step_size, method=solver)
        return x, self.nfe

    def log_likelihood(self, net, x1, divergence, solver, step_size=None, tol=1e-5, seed=SEED):
        torch = self.torch
        self.nfe = 0
        solver_obj = self.ODESolver(velocity_model=self.Wrapper(net))
        x1 = torch.as_tensor(np.asarray(x1))
        torch.manual_seed(seed)
        kw = {
            "x_1": x1,
            "log_p0": torch_gaussian_log_prob,
            "exact_divergence": divergence == "exact",
        }
        if solver == "dopri5":
            kw.update(step_size=None, method="dopri5", atol=tol, rtol=tol)
        else:
            kw.update(step_size=step_size, method=solver)
        _, logp = solver_obj.compute_likelihood(**kw)
        return logp.detach(), self.nfe
