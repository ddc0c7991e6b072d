"""The stochastic DDIM step as a Gaussian policy, and its log-probability: now in ``optim.generators.kernels``
(beside the flow-matching SDE step). These names stay importable from here."""

from optim.generators.kernels import (  # noqa: F401
    ddim_step, epsilon_from_output, flow_sde_step, gaussian_kl, gaussian_log_prob, step_alphas,
)
