"""Diffusion objectives (DDPM epsilon, rectified flow), classifier-free guidance and samplers."""

from racedit.diffusion.guidance import combine_guidance, guided_model_fn
from racedit.diffusion.objectives import (
    DDPMObjective,
    FlowObjective,
    Objective,
    ObjectiveSample,
    create_objective,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from racedit.diffusion.samplers import SAMPLERS, SamplingSchedule, generate, make_schedule

__all__ = [
    "SAMPLERS",
    "SamplingSchedule",
    "DDPMObjective",
    "FlowObjective",
    "Objective",
    "ObjectiveSample",
    "combine_guidance",
    "create_objective",
    "discretized_gaussian_log_likelihood",
    "generate",
    "guided_model_fn",
    "make_schedule",
    "normal_kl",
]
