"""anima_ft.diffusion: the rectified-flow objective, timestep samplers, loss and the Euler + CFG sampler."""

from anima_ft.diffusion.flow import (
    draw_noise_and_timesteps,
    interpolate,
    predict_noise,
    predict_x0,
    velocity_target,
)
from anima_ft.diffusion.loss import LossOutput, flow_matching_loss, loss_weight
from anima_ft.diffusion.sampler import euler_sample, sigma_schedule
from anima_ft.diffusion.timesteps import (
    flux_mu,
    flux_time_shift,
    sample_timesteps,
    shift_sigmas,
    timestep_quantiles,
)

__all__ = [
    "LossOutput",
    "draw_noise_and_timesteps",
    "euler_sample",
    "flow_matching_loss",
    "flux_mu",
    "flux_time_shift",
    "interpolate",
    "loss_weight",
    "predict_noise",
    "predict_x0",
    "sample_timesteps",
    "shift_sigmas",
    "sigma_schedule",
    "timestep_quantiles",
    "velocity_target",
]
