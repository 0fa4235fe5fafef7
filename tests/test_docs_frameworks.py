"""docs/frameworks.md's examples run as written and print what the page says: the
hand-written Gaussian flow and its log-likelihood against their closed forms, and Equinox
and Flax NNX models trained with cfm_loss and scored with the module passed as the field."""

import re

from conftest import run_markdown_examples


def test_frameworks_guide_examples():
    text = run_markdown_examples("frameworks.md", 3)
    flow_err = float(re.search(r"max \|x1 - \(mu \+ s x0\)\| (\S+)", text).group(1))
    logp_err = float(re.search(r"max \|log p - log N\(mu, s\^2\)\| (\S+),", text).group(1))
    assert flow_err < 1e-7 and logp_err < 1e-7, text
    eqx_nll, data_nll = map(
        float, re.search(r"Equinox: NLL (\S+) nats \(data's own (\S+)\)", text).groups()
    )
    nnx_nll = float(re.search(r"Flax NNX: NLL (\S+) nats", text).group(1))
    assert abs(data_nll - 2.85) < 0.1, text  # the mixture's entropy, estimated on 2,000 points
    # trained: within 0.3 nats of the data's own (an untrained field is several nats off)
    assert data_nll - 0.05 < eqx_nll < data_nll + 0.3, text
    assert data_nll - 0.05 < nnx_nll < data_nll + 0.3, text
