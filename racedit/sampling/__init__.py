"""Sampling: images and grids from a checkpoint (`generate`), the resumable npz job for FID (`npz_job`),
recalibration of the inference threshold for the weights being sampled (`calibration`), and the expert groups
of expert-parallel sampling (`expert_groups`)."""

from racedit.sampling.calibration import ThresholdCalibration, calibrate_thresholds
from racedit.sampling.expert_groups import expert_group_of, sampling_expert_group
from racedit.sampling.generate import (
    LoadedCheckpoint,
    grid_for_classes,
    load_for_sampling,
    sample_config_with,
    sample_images,
    sample_indexed,
    sample_labels,
    sample_seed,
    save_grid,
    to_uint8_nhwc,
)
from racedit.sampling.npz_job import (
    SamplingError,
    check_grid_out,
    grid_metadata,
    sampling_metadata,
    write_samples_npz,
)

__all__ = [
    "ThresholdCalibration", "calibrate_thresholds", "expert_group_of", "sampling_expert_group", "LoadedCheckpoint",
    "grid_for_classes", "load_for_sampling",
    "sample_config_with", "sample_images", "sample_indexed", "sample_labels", "sample_seed", "save_grid",
    "to_uint8_nhwc", "SamplingError", "check_grid_out", "grid_metadata", "sampling_metadata", "write_samples_npz",
]
