"""Decision rules (documented in `GeolocationPipeline.__call__`): how a model's outputs become ranked answers, for
every entry point. Torch is imported only to rank, so that `streetclip --help` lists the rules at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .answers import CONFIDENCE_RADII_KM, format_answers
from .gallery_vote import hybrid_scale, nearest_city_rows, neighbor_vote
from .geodesy import EARTH_RADIUS_KM, great_circle_km, unit_vectors


if TYPE_CHECKING:
    import torch

    from .gallery_store import GeoGallery
    from .modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation


# The rules that rank the candidate table by the heads' probabilities, and those that vote among a gallery's photos.
ZERO_SHOT_DECISIONS = ("greedy", "joint", "expected_distance", "within_km")
GALLERY_DECISIONS = ("gallery", "hybrid")
DECISIONS = ZERO_SHOT_DECISIONS + GALLERY_DECISIONS


class RankedPlaces(NamedTuple):
    """Top-k candidate cities per image under a zero-shot rule (`rank_places`), each of shape `(batch_size, k)`."""

    city_rows: torch.LongTensor  # rows of `model.candidate_places`
    scores: torch.Tensor  # the rule's probability (see `GeolocationPipeline.__call__`)
    country_scores: torch.Tensor  # p(country)
    joint_probabilities: torch.Tensor  # p(country) * p(region | country) * p(city | ...)
    region_scores: torch.Tensor  # p(region | country); 1 without a region level
    within_km: torch.Tensor | None = None  # (batch_size, k, len(CONFIDENCE_RADII_KM)): posterior mass within each
    radius_km: torch.Tensor | None = None  # the smallest radius holding `config.confidence_level`; inf for none
    calibrated: torch.Tensor | None = None  # whether `within_km` went through `config.calibration`
    expected_distances_km: torch.Tensor | None = None  # what `"expected_distance"` orders by; None under the others


class GalleryRankedPlaces(NamedTuple):
    """Answers under a gallery rule, of shape `(batch_size, k)`, padded with `city_rows` -1: `RankedPlaces`' fields for
    the candidate city nearest each chosen photo (`scores`: its share of the vote), and where and which that photo is.
    """

    city_rows: torch.LongTensor
    scores: torch.Tensor
    country_scores: torch.Tensor
    joint_probabilities: torch.Tensor
    region_scores: torch.Tensor
    latitudes: torch.Tensor
    longitudes: torch.Tensor
    gallery_rows: torch.LongTensor
    similarities: torch.Tensor
    within_km: torch.Tensor  # the vote's share within each radius of the answer
    radius_km: torch.Tensor
    calibrated: torch.Tensor


def default_decision(gallery: GeoGallery | str | None) -> str:
    """The rule used when none is named: the gallery vote with a gallery (or its name), else the paper's greedy one."""
    return "gallery" if gallery is not None else "greedy"


def validate_decision(decision: str) -> str:
    """`decision` when it names a rule of `DECISIONS`; otherwise a `ValueError` listing them."""
    if decision not in DECISIONS:
        raise ValueError(f"Unknown decision rule {decision!r}; choose one of {', '.join(DECISIONS)}.")
    return decision


def check_top_k(top_k: int) -> int:
    """`top_k` when it is a positive integer; otherwise a `ValueError`."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    return top_k


def check_decision(decision: str, gallery: GeoGallery | str | None) -> None:
    """Refuse an unknown rule, and a gallery rule without a gallery, saying how to give one."""
    if validate_decision(decision) in GALLERY_DECISIONS and gallery is None:
        raise ValueError(
            f"decision={decision!r} votes among the nearest photos of a gallery; give one: "
            "pipeline(..., gallery=FOLDER_OR_REPO) or --gallery FOLDER_OR_REPO (build it with "
            "`streetclip index build`)."
        )


def rank(
    model: StreetCLIPForGeolocation,
    outputs: GeolocationOutput,
    top_k: int = 1,
    decision: str | None = None,
    gallery: GeoGallery | None = None,
    country_rows: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Each image's `top_k` answers under `decision`, as columns `(batch_size, k)` named as `format_answers`'
    parameters; `country_rows` restricts a zero-shot rule to those countries, and the gallery rules refuse it."""
    decision = default_decision(gallery) if decision is None else decision
    if decision in GALLERY_DECISIONS and country_rows is not None:
        raise ValueError(
            f"candidate_countries does not apply to decision={decision!r}: the gallery's photos vote wherever they "
            f"are. Use a zero-shot decision ({', '.join(ZERO_SHOT_DECISIONS)}) with candidate_countries, or a gallery of "
            "those countries' photos."
        )
    check_decision(decision, gallery)
    if decision in GALLERY_DECISIONS:
        ranked = rank_gallery_places(model, outputs, gallery, decision, top_k)
    else:
        ranked = rank_places(model, outputs, top_k=top_k, decision=decision, country_rows=country_rows)
    return {name: column for name, column in ranked._asdict().items() if column is not None}


def rank_answers(model: StreetCLIPForGeolocation, outputs: GeolocationOutput, **options) -> list[list[dict[str, Any]]]:
    """Each image's answers in the pipeline's format, best first: `rank`'s, which takes the same `options`."""
    columns = rank(model, outputs, **options)
    return [
        format_answers(model.candidate_places, **{name: column[image] for name, column in columns.items()})
        for image in range(len(columns["city_rows"]))
    ]


def rank_places(
    model: StreetCLIPForGeolocation,
    outputs: GeolocationOutput,
    top_k: int = 1,
    decision: str = "greedy",
    country_rows: Sequence[int] | None = None,
) -> RankedPlaces:
    """Top-k candidate cities per image under a zero-shot rule (`"greedy"`'s first is `outputs.predicted_city`), each
    field `(batch_size, min(top_k, cities))`; `country_rows` restricts them as `model.restrict_countries` would."""
    import torch

    if validate_decision(decision) not in ZERO_SHOT_DECISIONS:
        raise ValueError(f"rank_places decides {', '.join(ZERO_SHOT_DECISIONS)}, not {decision!r}; see rank.")
    check_top_k(top_k)
    places, country_rows = model.candidate_places, None if country_rows is None else list(country_rows)
    with torch.no_grad():
        levels = _log_probabilities(model, outputs, country_rows)
        num_cities = places.num_cities
        if country_rows is not None:
            num_cities = sum(len(places.cities_by_country[row]) for row in country_rows)
        top_k = min(top_k, num_cities)
        posterior, calibrated = confidence_posterior(model, outputs, levels, country_rows)
        expected, scores = None, None
        if decision == "greedy":
            order = _greedy_order(model, outputs, levels["country"])[:, :top_k]
        else:
            order = levels["joint"].argsort(dim=-1, descending=True, stable=True)
            if decision in ("expected_distance", "within_km"):
                order, criterion = _by_criterion(model, order, levels["joint"], posterior, decision, top_k, num_cities)
                criterion = criterion[:, :top_k]
                expected, scores = (criterion, None) if decision == "expected_distance" else (None, criterion)
            order = order[:, :top_k]
        ranked = {name: values.gather(1, order).exp() for name, values in levels.items()}
        within = within_km(model, model.city_coordinates[order.cpu()].to(posterior.device), posterior)
    return RankedPlaces(
        city_rows=order,
        scores=ranked["city"] if decision == "greedy" else ranked["joint"] if scores is None else scores,
        country_scores=ranked["country"],
        joint_probabilities=ranked["joint"],
        region_scores=ranked["region"],
        **_confidence(model, within, calibrated),
        expected_distances_km=expected,
    )


def confidence_posterior(
    model: StreetCLIPForGeolocation,
    outputs: GeolocationOutput,
    levels: dict[str, torch.Tensor],
    country_rows: Sequence[int] | None = None,
) -> tuple[torch.Tensor, bool]:
    """The probability of each candidate city `(batch_size, cities)` that `within_km` sums: the joint posterior, with
    each level's logits divided by its temperature in `config.calibration` (and whether one was stored)."""
    if not model.config.calibration:
        return levels["joint"].exp(), False
    temperatures = model.config.calibration["temperatures"]
    region_logits = outputs.region_logits.float() / temperatures["region"] if model.uses_regions else None
    country_logits = outputs.country_logits.float() / temperatures["country"]
    city_logits = outputs.city_logits.float() / temperatures["city"]
    return model.log_probabilities(country_logits, region_logits, city_logits, country_rows)["joint"].exp(), True


def within_km(
    model: StreetCLIPForGeolocation, points: torch.Tensor, posterior: torch.Tensor, radii=CONFIDENCE_RADII_KM
) -> torch.Tensor:
    """The posterior mass of the candidate cities within each radius of each point `(batch_size, k, 2)` (degrees),
    shape `(batch_size, k, len(radii))`: by the cosine of the central angle, as d <= r where cos(d/R) >= cos(r/R)."""
    import torch

    answers = torch.from_numpy(unit_vectors(points[..., 0].cpu().numpy(), points[..., 1].cpu().numpy()))
    cosines = answers.to(posterior.device) @ model.city_vectors.to(posterior.device).T
    bounds = torch.cos(torch.tensor(radii, dtype=torch.float64) / EARTH_RADIUS_KM).tolist()
    mass = posterior.double()[:, :, None]
    return torch.stack([((cosines >= bound).double() @ mass)[..., 0] for bound in bounds], dim=-1).clamp(0, 1)


def _confidence(model: StreetCLIPForGeolocation, within: torch.Tensor, calibrated: bool) -> dict[str, torch.Tensor]:
    """`within_km` (through the calibration's monotone maps, if it has them), the smallest radius whose mass reaches
    `config.confidence_level` (inf where none does), and the `calibrated` flag, as columns of the answers."""
    import torch

    maps = (model.config.calibration or {}).get("within_km") if calibrated else None
    if maps:
        # Each radius through its monotone map; the running maximum keeps the mass non-decreasing with the radius.
        columns = [within[..., i].cpu().numpy() for i in range(len(CONFIDENCE_RADII_KM))]
        knots = [maps.get(str(radius)) for radius in CONFIDENCE_RADII_KM]
        mapped = [c if k is None else np.interp(c, k["x"], k["y"]) for c, k in zip(columns, knots, strict=True)]
        within = torch.from_numpy(np.stack(mapped, axis=-1)).to(within.device).cummax(dim=-1).values
    reached = within >= model.config.confidence_level
    radii = torch.tensor(CONFIDENCE_RADII_KM, dtype=torch.float64, device=within.device)
    radius = torch.where(reached.any(dim=-1), radii[reached.int().argmax(dim=-1)], float("inf"))
    return {"within_km": within, "radius_km": radius, "calibrated": torch.full_like(radius, calibrated).bool()}


def place_probabilities(
    model: StreetCLIPForGeolocation,
    outputs: GeolocationOutput,
    city_rows: torch.LongTensor,
    country_rows: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """`rank_places`' probabilities of given cities `(batch_size, k)` (-1 padding gets meaningless numbers)."""
    import torch

    with torch.no_grad():
        levels = _log_probabilities(model, outputs, None if country_rows is None else list(country_rows))
        rows = city_rows.clamp(min=0)
        return {
            f"{name}_scores" if name != "joint" else "joint_probabilities": levels[name].gather(1, rows).exp()
            for name in ("country", "region", "joint")
        }


def rank_gallery_places(
    model: StreetCLIPForGeolocation, outputs: GeolocationOutput, gallery: GeoGallery, decision: str, top_k: int = 1
) -> GalleryRankedPlaces:
    """Each image's `top_k` answers under `"gallery"` or `"hybrid"` (see `gallery_vote`), each named by the candidate
    city nearest its photo, with that city's zero-shot probabilities."""
    import torch

    if decision not in GALLERY_DECISIONS:
        raise ValueError(f"rank_gallery_places decides {', '.join(GALLERY_DECISIONS)}, not {decision!r}.")
    places = model.candidate_places
    settings = gallery.settings
    # The vote's answers are distinct neighbours, so no more than num_neighbors can come back.
    top_k = min(top_k, settings.num_neighbors, len(gallery))
    similarities, rows = gallery.search(outputs.image_embeds.float().cpu().numpy(), settings.num_neighbors)
    country_probabilities = outputs.country_logits.float().softmax(dim=-1).cpu().numpy()
    city_countries = np.asarray(places.city_countries)
    columns = {name: np.zeros((len(rows), top_k)) for name in ("scores", "latitudes", "longitudes", "similarities")}
    within = np.zeros((len(rows), top_k, len(CONFIDENCE_RADII_KM)))
    city_rows = np.full((len(rows), top_k), -1)
    gallery_rows = np.full((len(rows), top_k), -1)
    for image, (image_similarities, image_rows) in enumerate(zip(similarities, rows, strict=True)):
        found = image_rows >= 0
        image_similarities, image_rows = image_similarities[found], image_rows[found]
        latitudes, longitudes = gallery.latitudes[image_rows], gallery.longitudes[image_rows]
        neighbor_cities = nearest_city_rows(places, latitudes, longitudes)
        scale = None
        if decision == "hybrid":
            countries = city_countries[neighbor_cities]
            scale = hybrid_scale(countries, country_probabilities[image], settings.hybrid_countries)
        vote = neighbor_vote(image_similarities, latitudes, longitudes, settings, top_k=top_k, scale=scale)
        for position_rank, (position, score) in enumerate(vote.answers):
            distances, weights = vote.distances_km[position], vote.weights
            shares = [weights[distances <= radius].sum() / weights.sum() for radius in CONFIDENCE_RADII_KM]
            within[image, position_rank] = np.clip(shares, 0.0, 1.0)
            city_rows[image, position_rank] = neighbor_cities[position]
            gallery_rows[image, position_rank] = image_rows[position]
            columns["scores"][image, position_rank] = score
            columns["latitudes"][image, position_rank] = latitudes[position]
            columns["longitudes"][image, position_rank] = longitudes[position]
            columns["similarities"][image, position_rank] = image_similarities[position]
    device = outputs.country_logits.device
    city_rows = torch.as_tensor(city_rows, device=device)
    return GalleryRankedPlaces(
        city_rows=city_rows,
        gallery_rows=torch.as_tensor(gallery_rows, device=device),
        **place_probabilities(model, outputs, city_rows),
        **{name: torch.as_tensor(values, dtype=torch.float64, device=device) for name, values in columns.items()},
        **_confidence(model, torch.as_tensor(within, device=device), calibrated=False),
    )


def expected_distances_km(
    probabilities: np.ndarray,
    latitudes: np.ndarray,
    longitudes: np.ndarray,
    answers: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Each answer's expected great-circle distance in km to the true place, candidate j with probability
    `probabilities[..., j]` at `(latitudes, longitudes)[..., j]` (leading dimensions are batches); the answers are
    `(latitudes, longitudes)` of shape `(..., k)`, by default the candidates themselves."""
    answer_latitudes, answer_longitudes = answers or (latitudes, longitudes)
    distances = great_circle_km(
        answer_latitudes[..., :, None],
        answer_longitudes[..., :, None],
        latitudes[..., None, :],
        longitudes[..., None, :],
    )
    return (distances @ probabilities[..., None])[..., 0]


def _log_probabilities(
    model: StreetCLIPForGeolocation, outputs: GeolocationOutput, country_rows: list[int] | None
) -> dict[str, torch.Tensor]:
    """`model.log_probabilities` of `outputs`, refusing `country_rows` that are empty or not candidate countries."""
    num_countries = model.candidate_places.num_countries
    if country_rows == []:
        raise ValueError("country_rows is empty; give at least one row of model.candidate_places.country_names.")
    for row in country_rows or ():
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < num_countries:
            raise ValueError(
                f"country_rows holds {row!r}, which is not a row of the {num_countries} candidate countries "
                "(integers from 0); find a country's row with `model.candidate_places.country_index(name)`."
            )
    return model.log_probabilities(outputs.country_logits, outputs.region_logits, outputs.city_logits, country_rows)


def _greedy_order(
    model: StreetCLIPForGeolocation, outputs: GeolocationOutput, country_log_probs: torch.Tensor
) -> torch.LongTensor:
    """Every city row of each image in the greedy order of `forward`: by country logit (countries left out, with
    `country_log_probs` -inf, last), then region logit, then city logit, ties to the row listed first."""
    import torch

    country_logits = outputs.country_logits.float()[:, model.city_countries]
    keys = [-outputs.city_logits.float()]  # least significant first: each stable sort keeps the order before it
    if model.uses_regions:
        keys += [model.city_regions.expand_as(keys[0]), -outputs.region_logits.float()[:, model.city_regions]]
    keys += [model.city_countries.expand_as(keys[0]), -country_logits, country_log_probs.isinf()]
    order = torch.arange(keys[0].shape[1], device=keys[0].device).expand_as(keys[0])
    for key in keys:
        order = order.gather(1, key.gather(1, order).argsort(dim=-1, stable=True))
    return order


def _by_criterion(
    model: StreetCLIPForGeolocation,
    order: torch.LongTensor,
    joint_log_probs: torch.Tensor,
    posterior: torch.Tensor,
    decision: str,
    top_k: int,
    num_cities: int,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """The `config.expected_distance_candidates` most probable cities of `order` by the rule's criterion (the expected
    distance under their renormalised joint, or the `posterior` mass within `config.decision_radius_km`), then the
    next most probable up to `top_k`, so that no answer depends on `top_k`; rows and criterion `(batch_size, pool)`."""
    import torch

    candidates = min(model.config.expected_distance_candidates, num_cities)
    pool = order[:, : max(top_k, candidates)]
    points = model.city_coordinates[pool.cpu()].numpy()
    if decision == "expected_distance":
        weighed = order[:, :candidates]
        weights = joint_log_probs.gather(1, weighed).softmax(dim=-1).double().cpu().numpy()
        cities = model.city_coordinates[weighed.cpu()].numpy()
        expected = expected_distances_km(weights, cities[..., 0], cities[..., 1], (points[..., 0], points[..., 1]))
        criterion = torch.from_numpy(expected).to(pool.device)
    else:
        radius = (model.config.decision_radius_km,)
        criterion = -within_km(model, torch.from_numpy(points), posterior, radius)[..., 0].to(pool.device)
    reorder = torch.arange(pool.shape[1], device=pool.device).repeat(len(pool), 1)
    reorder[:, :candidates] = criterion[:, :candidates].argsort(dim=-1, stable=True)
    criterion = criterion.gather(1, reorder)
    return pool.gather(1, reorder), criterion if decision == "expected_distance" else -criterion
