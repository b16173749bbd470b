"""Where MagCache's calibrations live: ComfyUI's user directory, feature_cache/magcache/, one file per model and sampler.

The first run of a model + sampler + schedule without a usable calibration computes every
evaluation (its output is the uncached one) and records the curve; later runs, and runs of other
step counts that the stored curve covers, use it. The run's report says which happened.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import folder_paths

from ..cache_core import MagCache
from ..cache_core import calibration as curves

SUBFOLDER = os.path.join("feature_cache", "magcache")


@dataclasses.dataclass
class Calibration:
    directory: str
    fingerprint: str
    sampler: str
    schedule: list
    message: str


def calibration_directory() -> str:
    return os.path.join(folder_paths.get_user_directory(), SUBFOLDER)


def model_fingerprint(model_patcher) -> str:
    """Identifies the weights the model samples with: class, parameter shapes and sampled values, patches."""
    digest = hashlib.sha1()
    diffusion_model = model_patcher.model.diffusion_model
    digest.update(f"{type(diffusion_model).__module__}.{type(diffusion_model).__qualname__}".encode())
    for name, parameter in diffusion_model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
        if parameter.device.type != "meta" and parameter.numel():
            digest.update(parameter.detach().flatten()[:8].float().cpu().numpy().tobytes())
    for key in sorted(str(k) for k in getattr(model_patcher, "patches", {})):
        digest.update(key.encode())
    return digest.hexdigest()[:16]


def sampler_name(sampler) -> str:
    function = getattr(sampler, "sampler_function", None)
    return getattr(function, "__name__", type(sampler).__name__)


def calibrated_policy(policy: MagCache, model_patcher, sampler, schedule: list):
    """The policy with its stored curve for this run, or unchanged (calibrating) with the reason."""
    calibration = Calibration(calibration_directory(), model_fingerprint(model_patcher), sampler_name(sampler),
                              list(schedule), "")
    curve, how = curves.load(calibration.directory, calibration.fingerprint, calibration.sampler, schedule)
    if curve is None:
        calibration.message = f"{how}: this run computes every step to calibrate MagCache; later runs use it"
        return policy, calibration
    calibration.message = how
    return dataclasses.replace(policy, curve=curve), calibration


def save_calibration(calibration: Calibration, curve) -> str:
    if curve is None:
        return "MagCache calibration not saved: the run had fewer than two model evaluations"
    path = curves.save(calibration.directory, calibration.fingerprint, calibration.sampler, calibration.schedule, curve)
    return f"MagCache calibration saved to {path}"
