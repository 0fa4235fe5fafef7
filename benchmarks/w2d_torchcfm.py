"""The side of ``torchcfm`` in the W2D benchmark.

``ConditionalFlowMatcher(sigma=0)`` and the training loop of torchcfm's 2-D examples;
torchcfm has no solver or likelihood API of its own, so sampling and likelihood are the
examples' ``torchdiffeq.odeint`` (:class:`w2d_torch.TorchSide`). For W2D-small the model is
torchcfm's own example MLP, which has exactly that shape.
"""

from __future__ import annotations

from w2d_torch import TorchSide, torch_checkerboard, torch_net
from w2d_workload import W2D_SMALL


class TorchCFMSide(TorchSide):
    """torchcfm: ConditionalFlowMatcher(sigma=0) + torchdiffeq.odeint (its examples' way)."""

    name = "torchcfm"

    def __init__(self, spec):
        super().__init__(spec)
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        self.fm = ConditionalFlowMatcher(sigma=0.0)

    def make_net(self):
        if self.spec == W2D_SMALL:  # torchcfm's own example MLP is exactly W2D-small
            from torchcfm.models import MLP

            return MLP(dim=2, time_varying=True, w=64)
        return torch_net(self.spec)

    def make_step(self, net, opt, batch):
        torch, fm = self.torch, self.fm

        def step():  # the training loop of torchcfm's 2-D examples
            opt.zero_grad()
            x0 = torch.randn(batch, 2)
            x1 = torch_checkerboard(batch)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            vt = net(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            opt.step()
            return loss.detach()

        return step
