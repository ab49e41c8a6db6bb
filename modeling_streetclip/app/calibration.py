"""Calibration of `within_km` (`streetclip calibrate`): a temperature per level and a monotone map per radius, fitted
on labelled photos, and the calibration error (ECE over equal-mass bins, Brier score) it and the benchmark report."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..decisions import rank_answers
from ..gallery_vote import nearest_city_rows
from ..geodesy import CONFIDENCE_RADII_KM, great_circle_km
from . import UsageError
from .batch import geolocate_images


if TYPE_CHECKING:
    from ..modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation
    from .benchmark_data import Benchmark

# ECE over equal-mass bins (Nixon et al., 2019): equal-width ones leave a peaked confidence's middle nearly empty.
NUM_BINS = 10
# Photos to measure on (3 a bin) and to fit three temperatures on: 100 in all meet both at the default hold-out, 0.3.
MIN_HELD_OUT, MIN_FITTED = 30, 70
MIN_PHOTOS = MIN_HELD_OUT + MIN_FITTED
# A confidence is stated to a hundredth of a percent: finer differences are noise that must not split ties.
CONFIDENCE_DECIMALS = 4


def equal_mass_bins(confidences: np.ndarray, num_bins: int = NUM_BINS) -> list[np.ndarray]:
    """Indices of `confidences` in up to `num_bins` bins of about equal size, split at their quantiles; ties (to
    `CONFIDENCE_DECIMALS`) share a bin, since splitting them would order them by something else."""
    confidences = np.round(np.asarray(confidences, dtype=np.float64), CONFIDENCE_DECIMALS)
    edges = np.unique(np.quantile(confidences, np.linspace(0, 1, num_bins + 1)[1:-1])) if len(confidences) else []
    which = np.searchsorted(edges, confidences, side="left")
    return [part for part in (np.flatnonzero(which == b) for b in range(len(edges) + 1)) if len(part)]


def calibration_errors(confidences: np.ndarray, hits: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, float]:
    """ECE over `equal_mass_bins` (mean |confidence - accuracy|, each bin weighed by its share) and the Brier score."""
    confidences, hits = np.asarray(confidences, dtype=np.float64), np.asarray(hits, dtype=np.float64)
    bins = equal_mass_bins(confidences, num_bins)
    ece = sum(len(part) * abs(confidences[part].mean() - hits[part].mean()) for part in bins) / len(confidences)
    return {"ece": float(ece), "brier": float(np.mean((confidences - hits) ** 2))}


def radius_errors(within: np.ndarray, hits: np.ndarray) -> dict[str, dict[str, float]]:
    """`calibration_errors` at each radius of `CONFIDENCE_RADII_KM`, keyed `"ece"`/`"brier"`, then by the radius."""
    errors = [calibration_errors(within[:, i], hits[:, i]) for i in range(len(CONFIDENCE_RADII_KM))]
    return {
        name: {str(r): error[name] for r, error in zip(CONFIDENCE_RADII_KM, errors, strict=True)}
        for name in ("ece", "brier")
    }


def answer_hits(answers: Sequence[dict[str, Any]], truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first answers' `within_km` and whether the truth `(n, 2)` lies within each radius, both `(n, radii)`."""
    within = np.array([[answer["within_km"][str(r)] for r in CONFIDENCE_RADII_KM] for answer in answers])
    points = np.array([[answer["latitude"], answer["longitude"]] for answer in answers])
    distances = great_circle_km(points[:, 0], points[:, 1], truths[:, 0], truths[:, 1])
    return within.reshape(-1, len(CONFIDENCE_RADII_KM)), distances[:, None] <= np.array(CONFIDENCE_RADII_KM)


def fit_temperatures(model: StreetCLIPForGeolocation, outputs: GeolocationOutput, truths: np.ndarray) -> dict:
    """Each level's temperature minimising the negative log-likelihood of the candidate city nearest each truth, all at
    once (the joint sums the levels' log-probabilities), by L-BFGS over their logarithms."""
    device = outputs.country_logits.device
    targets = torch.as_tensor(nearest_city_rows(model.candidate_places, truths[:, 0], truths[:, 1]), device=device)
    logits = {level: getattr(outputs, f"{level}_logits").detach().float() for level in model.config.levels}
    log_temperatures = torch.zeros(len(logits), device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperatures], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = {level: values / t.exp() for (level, values), t in zip(logits.items(), log_temperatures, strict=True)}
        joint = model.log_probabilities(scaled["country"], scaled.get("region"), scaled["city"])["joint"]
        value = -joint.gather(1, targets[:, None]).mean()
        value.backward()
        return value

    optimizer.step(loss)
    return {level: float(t.exp()) for level, t in zip(logits, log_temperatures.detach(), strict=True)}


def calibrate(
    model: StreetCLIPForGeolocation,
    image_processor,
    benchmark: Benchmark,
    holdout: float = 0.3,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Fit the temperatures, then a monotone map per radius, on all but a `holdout` share of `benchmark`'s photos and
    set them on `model.config`; return them with the held-out ECE and Brier per radius before, with the temperatures
    only, and after."""
    if bad := [row for row in benchmark.rows if row.error is not None]:
        named = "; ".join(f"{row.id!r}: {row.error}" for row in bad[:5])
        raise UsageError(
            f"{len(bad)} of the {len(benchmark.rows)} rows have no valid coordinates ({named}); fix them."
        )
    if len(benchmark.rows) < MIN_PHOTOS:
        raise UsageError(
            f"{benchmark.name} has {len(benchmark.rows)} labelled photos; calibrating needs at least {MIN_PHOTOS}, part "
            f"held out to measure the calibration error on."
        )
    cut = round(holdout * len(benchmark.rows))
    if cut < MIN_HELD_OUT or len(benchmark.rows) - cut < MIN_FITTED:
        raise UsageError(
            f"--holdout {holdout} holds out {cut} of the {len(benchmark.rows)} photos and fits on the other "
            f"{len(benchmark.rows) - cut}; calibrating needs at least {MIN_HELD_OUT} to measure on and {MIN_FITTED} to "
            "fit on."
        )
    records = list(
        geolocate_images(model, image_processor, benchmark.images, batch_size=batch_size, return_embeddings=True)
    )
    if unreadable := [benchmark.rows[record.index].id for record in records if record.error is not None]:
        raise UsageError(f"{len(unreadable)} photos could not be read, among them {unreadable[:5]}; fix or drop them.")
    truths = np.array([[row.latitude, row.longitude] for row in benchmark.rows])
    embeds = torch.stack([record.image_embeds for record in records]).to(model.device, model.dtype)
    with torch.no_grad():
        outputs = model.locate_embeddings(embeds)
    positions = list(range(len(truths)))
    random.Random(seed).shuffle(positions)
    held_out, fitting = positions[:cut], positions[cut:]

    def hits(rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return answer_hits([answers[0] for answers in rank_answers(model, _select(outputs, rows))], truths[rows])

    before = radius_errors(*hits(held_out))
    temperatures = fit_temperatures(model, _select(outputs, fitting), truths[fitting])
    model.config.calibration = {"temperatures": temperatures}
    with_temperatures = radius_errors(*hits(held_out))
    # A monotone map per radius takes up what temperatures cannot (a city's mass is not the chance of a photo within 1 km).
    within, hit = hits(fitting)
    maps = {str(r): isotonic_map(within[:, i], hit[:, i]) for i, r in enumerate(CONFIDENCE_RADII_KM)}
    model.config.calibration = {"temperatures": temperatures, "within_km": maps}
    return {
        "temperatures": temperatures,
        "within_km": maps,
        "num_photos": len(truths),
        "num_fitted": len(fitting),
        "num_held_out": len(held_out),
        "held_out_before": before,
        "held_out_temperatures_only": with_temperatures,
        "held_out_after": radius_errors(*hits(held_out)),
    }


def isotonic_map(confidences: np.ndarray, hits: np.ndarray) -> dict[str, list[float]]:
    """The non-decreasing map from confidence to share of hits closest in squared error (isotonic regression by pooling
    adjacent violators; scikit-learn's `IsotonicRegression` fits the same, but is not a dependency), as knots
    `{"x": [...], "y": [...]}` that `within_km` interpolates."""
    values, inverse = np.unique(np.round(confidences, CONFIDENCE_DECIMALS), return_inverse=True)
    sums, counts = np.bincount(inverse, weights=hits.astype(np.float64)), np.bincount(inverse).astype(np.float64)
    blocks: list[list[float]] = []  # [sum of hits, photos, first value, last value], means non-decreasing
    for value, total, count in zip(values, sums, counts, strict=True):
        blocks.append([total, count, value, value])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, _, last = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
            blocks[-1][3] = last
    return {
        "x": [float(value) for block in blocks for value in (block[2], block[3])],
        "y": [float(block[0] / block[1]) for block in blocks for _ in range(2)],
    }


def _select(outputs: GeolocationOutput, rows: list[int]) -> GeolocationOutput:
    return type(outputs)(**{name: value[rows] for name, value in outputs.items() if value is not None})
