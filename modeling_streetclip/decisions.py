"""Decision rules (documented in `GeolocationPipeline.__call__`): how a model's outputs become ranked answers, for
every entry point. Torch is imported only to rank, so that `streetclip --help` lists the rules at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .answers import format_answers
from .gallery_vote import hybrid_scale, nearest_city_rows, neighbor_vote
from .geodesy import CONFIDENCE_RADII_KM, EARTH_RADIUS_KM, great_circle_km, unit_vectors


if TYPE_CHECKING:
    import torch

    from .gallery_store import GeoGallery
    from .modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation


# The rules that rank the candidate table by the heads' probabilities, and those that vote among a gallery's photos.
ZERO_SHOT_DECISIONS = ("greedy", "joint", "expected_distance", "within_km")
GALLERY_DECISIONS = ("gallery", "hybrid")
DECISIONS = ZERO_SHOT_DECISIONS + GALLERY_DECISIONS


class RankedPlaces(NamedTuple):
    """Top-k answers per image, each field of shape `(batch_size, k)`: candidate cities (under a gallery rule the one
    nearest each chosen photo, padded with -1), their probabilities and confidence, and a gallery rule's photos."""

    city_rows: torch.LongTensor  # rows of `model.candidate_places`
    scores: torch.Tensor  # the rule's probability (see `GeolocationPipeline.__call__`); a gallery rule's vote share
    country_scores: torch.Tensor  # p(country)
    joint_probabilities: torch.Tensor  # p(country) * p(region | country) * p(city | ...)
    region_scores: torch.Tensor  # p(region | country); 1 without a region level
    within_km: torch.Tensor | None = None  # (batch_size, k, len(CONFIDENCE_RADII_KM)): posterior mass within each
    radius_km: torch.Tensor | None = None  # the smallest radius holding `config.confidence_level`; inf for none
    calibrated: torch.Tensor | None = None  # whether `within_km` went through `config.calibration`
    expected_distances_km: torch.Tensor | None = None  # what `"expected_distance"` orders by
    latitudes: torch.Tensor | None = None  # the chosen photo's, under a gallery rule; so the next three
    longitudes: torch.Tensor | None = None
    gallery_rows: torch.LongTensor | None = None
    similarities: torch.Tensor | None = None


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


def check_country_restriction(decision: str, option: str = "candidate_countries") -> None:
    """Refuse fewer countries under a gallery rule: its photos vote wherever they are, and each answer would take the
    name of the restricted table's nearest city, in another country."""
    if decision in GALLERY_DECISIONS:
        raise ValueError(
            f"{option} does not apply to decision={decision!r}: the gallery's photos vote wherever they are. Use a "
            f"zero-shot decision ({', '.join(ZERO_SHOT_DECISIONS)}) with {option}, or a gallery of those countries' "
            "photos."
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
    if country_rows is not None:
        check_country_restriction(decision)
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
        num_cities = sum(len(places.cities_by_country[row]) for row in country_rows or range(places.num_countries))
        top_k = min(top_k, num_cities)
        posterior, calibrated = confidence_posterior(model, outputs, levels, country_rows)
        criterion = None
        if decision == "greedy":
            order = _greedy_order(model, outputs, levels["country"])[:, :top_k]
        elif decision == "joint":
            order = levels["joint"].argsort(dim=-1, descending=True, stable=True)[:, :top_k]
        else:
            order, criterion = _by_criterion(model, levels["joint"], posterior, decision, top_k, num_cities)
        ranked = {name: values.gather(1, order).exp() for name, values in levels.items()}
        within = within_km(model, model.city_coordinates[order.cpu()].to(posterior.device), posterior)
    return RankedPlaces(
        city_rows=order,
        scores=criterion if decision == "within_km" else ranked["city" if decision == "greedy" else "joint"],
        country_scores=ranked["country"],
        joint_probabilities=ranked["joint"],
        region_scores=ranked["region"],
        **_confidence(model, within, calibrated),
        expected_distances_km=criterion if decision == "expected_distance" else None,
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
        columns, knots = np.moveaxis(within.cpu().numpy(), -1, 0), [maps.get(str(r)) for r in CONFIDENCE_RADII_KM]
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
        names = {"country": "country_scores", "region": "region_scores", "joint": "joint_probabilities"}
        return {name: levels[level].gather(1, city_rows.clamp(min=0)).exp() for level, name in names.items()}


def rank_gallery_places(
    model: StreetCLIPForGeolocation, outputs: GeolocationOutput, gallery: GeoGallery, decision: str, top_k: int = 1
) -> RankedPlaces:
    """Each image's `top_k` answers under `"gallery"` or `"hybrid"` (see `gallery_vote`), each named by the candidate
    city nearest its photo, with that city's zero-shot probabilities; `scores` are vote shares."""
    import torch

    if decision not in GALLERY_DECISIONS:
        raise ValueError(f"rank_gallery_places decides {', '.join(GALLERY_DECISIONS)}, not {decision!r}.")
    places, settings = model.candidate_places, gallery.settings
    # The vote's answers are distinct neighbours, so no more than num_neighbors can come back.
    top_k = min(top_k, settings.num_neighbors, len(gallery))
    similarities, rows = gallery.search(outputs.image_embeds.float().cpu().numpy(), settings.num_neighbors)
    country_probabilities = outputs.country_logits.float().softmax(dim=-1).cpu().numpy()
    city_countries, shape = np.asarray(places.city_countries), (len(rows), top_k)
    columns = {name: np.zeros(shape) for name in ("scores", "latitudes", "longitudes", "similarities")}
    columns |= {"city_rows": np.full(shape, -1), "gallery_rows": np.full(shape, -1)}
    within = np.zeros((*shape, len(CONFIDENCE_RADII_KM)))
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
        chosen = np.asarray([position for position, _ in vote.answers], dtype=int)
        columns["scores"][image, : len(chosen)] = [score for _, score in vote.answers]
        for name, values in zip(
            ("city_rows", "gallery_rows", "latitudes", "longitudes", "similarities"),
            (neighbor_cities, image_rows, latitudes, longitudes, image_similarities),
            strict=True,
        ):
            columns[name][image, : len(chosen)] = values[chosen]
        # Each answer's share of the vote within each radius of it: (answers, neighbours, radii) summed over neighbours.
        near = vote.distances_km[chosen][..., None] <= np.asarray(CONFIDENCE_RADII_KM)
        within[image, : len(chosen)] = np.clip(np.einsum("anr,n->ar", near, vote.weights) / vote.weights.sum(), 0, 1)
    device = outputs.country_logits.device
    rows = {name: torch.as_tensor(columns.pop(name), device=device) for name in ("city_rows", "gallery_rows")}
    return RankedPlaces(
        **rows,
        **place_probabilities(model, outputs, rows["city_rows"]),
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
    answer_lats, answer_lons = answers or (latitudes, longitudes)
    distances = great_circle_km(
        answer_lats[..., None], answer_lons[..., None], latitudes[..., None, :], longitudes[..., None, :]
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
    country_logits = outputs.country_logits.float()[:, model.city_countries]
    keys = [-outputs.city_logits.float()]  # least significant first: each stable sort keeps the order before it
    if model.uses_regions:
        keys += [model.city_regions.expand_as(keys[0]), -outputs.region_logits.float()[:, model.city_regions]]
    keys += [model.city_countries.expand_as(keys[0]), -country_logits, country_log_probs.isinf()]
    order = keys[0].argsort(dim=-1, stable=True)
    for key in keys[1:]:
        order = order.gather(1, key.gather(1, order).argsort(dim=-1, stable=True))
    return order


def _by_criterion(
    model: StreetCLIPForGeolocation,
    joint_log_probs: torch.Tensor,
    posterior: torch.Tensor,
    decision: str,
    top_k: int,
    num_cities: int,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """The `config.expected_distance_candidates` most probable cities by the rule's criterion (the expected distance
    under their renormalised joint, or the `posterior` mass within `config.decision_radius_km`), then the next most
    probable up to `top_k`, so that no answer depends on `top_k`; rows and criterion `(batch_size, top_k)`."""
    import torch

    candidates = min(model.config.expected_distance_candidates, num_cities)
    pool = joint_log_probs.argsort(dim=-1, descending=True, stable=True)[:, : max(top_k, candidates)]
    points = model.city_coordinates[pool.cpu()]
    if decision == "expected_distance":
        weights = joint_log_probs.gather(1, pool[:, :candidates]).softmax(dim=-1).double().cpu().numpy()
        cities, answers = points[:, :candidates].numpy(), points.numpy()
        expected = expected_distances_km(weights, cities[..., 0], cities[..., 1], (answers[..., 0], answers[..., 1]))
        criterion = torch.from_numpy(expected).to(pool.device)
    else:
        criterion = -within_km(model, points, posterior, (model.config.decision_radius_km,))[..., 0].to(pool.device)
    reorder = torch.arange(pool.shape[1], device=pool.device).repeat(len(pool), 1)
    reorder[:, :candidates] = criterion[:, :candidates].argsort(dim=-1, stable=True)
    criterion = criterion.gather(1, reorder)[:, :top_k]
    return pool.gather(1, reorder)[:, :top_k], criterion if decision == "expected_distance" else -criterion
