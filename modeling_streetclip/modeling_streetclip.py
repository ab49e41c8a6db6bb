"""StreetCLIP for geolocation: CLIP plus hierarchical linear probing over candidate countries, optional regions, and
cities.

The probe heads are the normalised prompt embeddings times CLIP's logit scale, so `head(image_embedding)` is
exactly CLIP's zero-shot logit for each prompt. They are built once from the text tower and saved with the model;
a saved model then infers with the vision tower alone.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.utils import ModelOutput, logging

from .configuration_streetclip import (
    CANDIDATE_SETTINGS,
    GEOLOCATION_SETTINGS,
    HUB_KWARGS,
    PAPER_LEVELS,
    PROMPT_SETTINGS,
    REGION_LEVELS,
    StreetCLIPConfig,
    validate_decision,
)
from .gazetteer import CandidatePlaces, great_circle_km, resolve_country_name
from .processing_streetclip import CandidatePrompts, StreetCLIPProcessor


logger = logging.get_logger(__name__)

_HEAD_NAMES = ("country_head", "region_head", "city_head")


@dataclass
class GeolocationOutput(ModelOutput):
    """
    Output of [`StreetCLIPForGeolocation`]: the paper's greedy hierarchical decision for each image.

    Args:
        country_logits (`torch.FloatTensor` of shape `(batch_size, num_countries)`):
            CLIP logits of the image against every candidate country prompt.
        city_logits (`torch.FloatTensor` of shape `(batch_size, max_cities_per_country)`):
            CLIP logits against the city prompts of each image's predicted country (with a region level: of its
            predicted region); `-inf` elsewhere and where that country has fewer cities than the widest one.
        city_indices (`torch.LongTensor` of shape `(batch_size, max_cities_per_country)`):
            Rows of the candidate table that `city_logits` refer to (the predicted country's cities); `-1` for
            padding.
        predicted_country (`torch.LongTensor` of shape `(batch_size,)`):
            Row of the best country in `model.candidate_places`.
        predicted_city (`torch.LongTensor` of shape `(batch_size,)`):
            Row of the best city of that country (or region) in `model.candidate_places`.
        predicted_coordinates (`torch.DoubleTensor` of shape `(batch_size, 2)`):
            Latitude and longitude in degrees of the predicted city.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image embeddings, as the heads score them.
        region_logits (`torch.FloatTensor` of shape `(batch_size, max_regions_per_country)`, *optional*):
            With a region level: CLIP logits against the region prompts of each image's predicted country; `-inf`
            for padding.
        region_indices (`torch.LongTensor` of shape `(batch_size, max_regions_per_country)`, *optional*):
            Region rows of the candidate table that `region_logits` refer to; `-1` for padding.
        predicted_region (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            With a region level: row of the best region of the predicted country.
    """

    country_logits: torch.FloatTensor | None = None
    city_logits: torch.FloatTensor | None = None
    city_indices: torch.LongTensor | None = None
    predicted_country: torch.LongTensor | None = None
    predicted_city: torch.LongTensor | None = None
    predicted_coordinates: torch.DoubleTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    region_logits: torch.FloatTensor | None = None
    region_indices: torch.LongTensor | None = None
    predicted_region: torch.LongTensor | None = None


class RankedPlaces(NamedTuple):
    """Top-k candidate cities per image from [`StreetCLIPForGeolocation.rank_places`], each of shape
    `(batch_size, k)`, ordered by the decision rule, each answer carrying the number that rule sorts by (`scores`).

    - `"greedy"` (the paper's): countries by p(country), then regions by p(region | country), then cities by
      p(city | country or region); `scores` is that last p(city | ...), and the first answer is the paper's decision.
    - `"joint"`: by the joint probability, which is then `scores`.
    - `"expected_distance"`: by the expected great-circle distance in km to the true place under the joint posterior,
      smallest first; `scores` holds that distance.
    """

    city_rows: torch.LongTensor  # rows of `model.candidate_places`
    scores: torch.Tensor  # what the decision rule orders by (see above)
    country_scores: torch.Tensor  # p(country) of each answer's country
    joint_probabilities: torch.Tensor  # p(country) * p(region | country) * p(city | ...)
    region_scores: torch.Tensor  # p(region | country) of each answer's region; 1 without a region level


class StreetCLIPForGeolocation(CLIPModel):
    r"""
    CLIP with country (optionally region) and city probe heads: the StreetCLIP method of hierarchical zero-shot
    geolocation.

    Loads a plain CLIP checkpoint (such as `geolocal/StreetCLIP`) unchanged, building its heads from the text tower,
    or a folder saved by this class, which carries its heads and candidate table.

    Example:

    ```python
    >>> from modeling_streetclip import StreetCLIPForGeolocation
    >>> model = StreetCLIPForGeolocation.from_pretrained("geolocal/StreetCLIP")  # doctest: +SKIP
    >>> outputs = model(pixel_values)  # doctest: +SKIP
    >>> model.candidate_places.city_names[outputs.predicted_city[0]]  # doctest: +SKIP
    'Paris'
    ```
    """

    config_class = StreetCLIPConfig
    main_input_name = "pixel_values"

    def __init__(self, config: StreetCLIPConfig, vision_only: bool = False):
        super().__init__(config)
        if vision_only:
            # The heads already hold everything the text tower would contribute at inference.
            self.text_model = None
            self.text_projection = None
            self._keys_to_ignore_on_load_unexpected.update({r"^text_model\.", r"^text_projection\."})
        # Saved with the heads, whose rows follow the candidate table: a table changed apart from them is caught on
        # load (see `from_pretrained`).
        self.register_buffer("candidate_checksum", None)
        places = None if config.candidate_places is None else CandidatePlaces.from_dict(config.candidate_places)
        self._install_candidates(places)

    def _install_candidates(self, places: CandidatePlaces | None) -> None:
        """Size the heads for `places` and index its cities (and regions) by country (heads are filled by the
        caller). A table with regions gets a region head: the table decides the levels."""
        self.candidate_places = places
        # Tokenised city and region prompts, with their number of templates, of countries whose heads below the
        # country level are not built yet (see `build_city_heads`).
        self.pending_city_prompts: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
        self.pending_region_prompts: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
        self.country_head = self.region_head = self.city_head = None
        if places is None:
            # A plain CLIP checkpoint: no heads until `set_candidates` builds them from the text tower.
            return
        device, dtype = self.visual_projection.weight.device, self.visual_projection.weight.dtype

        def head(rows: int) -> nn.Linear:
            return nn.Linear(self.projection_dim, rows, bias=False, device=device, dtype=dtype)

        self.country_head = head(places.num_countries)
        self.city_head = head(places.num_cities)
        self.candidate_checksum = torch.tensor(places.checksum(), dtype=torch.long, device=device)
        # Index tables stay plain CPU tensors: they are data about the candidates, not weights to load or cast, and
        # float64 coordinates would move a city by kilometres in bfloat16.
        self.city_rows = _padded_rows(places.cities_by_country)
        self.city_countries = torch.tensor(places.city_countries, dtype=torch.long, device="cpu")
        self.city_coordinates = torch.tensor(
            list(zip(places.city_latitudes, places.city_longitudes, strict=True)), dtype=torch.float64, device="cpu"
        ).reshape(-1, 2)
        if places.has_regions:
            self.region_head = head(places.num_regions)
            self.region_rows = _padded_rows(places.regions_by_country)
            # Where each city's region sits among its country's regions: the column of `region_rows` it refers to.
            slot = {row: column for regions in places.regions_by_country for column, row in enumerate(regions)}
            self.city_region_slots = _padded_rows(
                [[slot[places.city_regions[row]] for row in rows] for rows in places.cities_by_country]
            )
            self.city_region_rows = torch.tensor(places.city_regions, dtype=torch.long, device="cpu")
            self.region_countries = torch.tensor(places.region_countries, dtype=torch.long, device="cpu")

    @property
    def uses_regions(self) -> bool:
        """Whether this model decides a first-level region between the country and the city."""
        return self.region_head is not None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        candidates: CandidatePlaces | None = None,
        processor: StreetCLIPProcessor | None = None,
        vision_only: bool | str = False,
        **kwargs,
    ):
        r"""
        Load a plain CLIP checkpoint (`model_type: "clip"`) or a folder saved by this class, locally or from the Hub.

        Args:
            candidates ([`CandidatePlaces`], *optional*):
                Replace the candidate places; heads are rebuilt from the text tower. By default a saved model keeps
                its own and a plain CLIP checkpoint gets GeoNames' cities of the configured countries.
            processor ([`StreetCLIPProcessor`], *optional*):
                Renders and tokenises the prompts when heads are built; by default the checkpoint's own, with the
                configuration's templates. Its templates win over the configuration's.
            vision_only (`bool` or `"auto"`, *optional*, defaults to `False`):
                Skip the text tower (about a quarter of CLIP's weights); needs a checkpoint with heads for the
                requested candidates. `"auto"` skips it exactly when nothing needs building: the loading rule of the
                command line and the benchmark runner.
            kwargs:
                Geolocation settings of [`StreetCLIPConfig`] (`candidate_countries` by name or ISO code, `levels`,
                the candidate table's `city_allocation`, `cities_per_country`, `city_budget`, `min_city_population`
                and `city_merge_radius_km`, the templates and `expected_distance_candidates`), and everything
                [`~PreTrainedModel.from_pretrained`] accepts.
        """
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        settings = {key: kwargs.pop(key) for key in GEOLOCATION_SETTINGS & kwargs.keys()}
        if settings.get("candidate_countries") is not None:
            settings["candidate_countries"] = [resolve_country_name(name) for name in settings["candidate_countries"]]
        if "levels" in settings:
            settings["levels"] = list(settings["levels"])  # the PAPER_LEVELS and REGION_LEVELS tuples, say
        config = StreetCLIPConfig.from_checkpoint(
            pretrained_model_name_or_path, kwargs.pop("config", None), **hub_kwargs
        )
        config, changed = config.with_geolocation_settings(**settings)
        if candidates is None and (config.candidate_places is None or changed & CANDIDATE_SETTINGS):
            candidates = CandidatePlaces.from_config(config)
        build_heads = candidates is not None or bool(changed & PROMPT_SETTINGS)
        vision_only = _vision_only(vision_only, build_heads, pretrained_model_name_or_path)
        if build_heads and processor is None:  # loaded before the weights, so that a folder without one fails fast
            processor = _prompt_processor(pretrained_model_name_or_path, config, hub_kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            config=config,
            vision_only=vision_only,
            output_loading_info=True,
            **kwargs,
        )
        if build_heads or model._check_saved_heads(loading_info, pretrained_model_name_or_path):
            processor = processor or _prompt_processor(pretrained_model_name_or_path, config, hub_kwargs)
            model.set_candidates(candidates or model.candidate_places, processor)
        return (model, loading_info) if output_loading_info else model

    def _check_saved_heads(self, loading_info: dict, source) -> bool:
        """Whether the checkpoint lacks its heads (so they must be built); saved heads whose candidate table was
        changed apart from them are refused, naming `source`."""
        missing = {key.split(".")[0] for key in loading_info["missing_keys"]}
        if missing & set(_HEAD_NAMES):
            if self.text_model is None:
                raise ValueError(
                    f"{str(source)!r} lacks its prompt heads, and vision_only=True leaves no text tower to rebuild "
                    "them; load with vision_only=False."
                )
            return True
        checksum = self.candidate_places.checksum()
        if "candidate_checksum" in missing:
            # A folder saved before checksums were kept: its heads are taken as they are, and checksummed from now on.
            self.candidate_checksum = torch.tensor(checksum, dtype=torch.long, device=self.country_head.weight.device)
        elif int(self.candidate_checksum) != checksum:
            raise ValueError(
                f"{str(source)!r}: the candidate table in its config.json (`candidate_places`) is not the one its "
                "prompt heads were built for (their checksums differ), so answers would name the wrong places. The "
                "folder was edited or assembled from two saves: save it again from the model that built the heads, "
                "or rebuild them with `from_pretrained(..., candidates=CandidatePlaces.from_dict(...))`."
            )
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, heads and the candidate table; pending city heads are built first so that the folder
        infers without a text tower. The processor is saved on its own (`processor.save_pretrained`)."""
        # Without its text tower the folder would reload with a random one, and heads rebuilt from it would be noise.
        self._require_text_tower("be saved")
        self.build_city_heads(list(self.pending_city_prompts))
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def set_candidates(
        self,
        places: CandidatePlaces,
        prompts: StreetCLIPProcessor | CandidatePrompts,
        build_all_city_heads: bool = False,
    ) -> None:
        """Replace the candidate places and build their heads from the text tower.

        `prompts` is the processor that renders and tokenises them, or prompts it tokenised already
        (`processor.candidate_prompts(places)`); the configuration records their templates, and its `levels` follow
        the table (a table with regions gives the region level). The country head is built at once (one prompt per
        country, cheap). Region and city heads are built per country on first use, since encoding every city prompt
        costs far more than a typical inference session needs; pass `build_all_city_heads=True` (or save the model)
        to build them all now.
        """
        self._require_text_tower("build prompt heads")
        if not isinstance(prompts, CandidatePrompts):
            prompts = prompts.candidate_prompts(places)
        prompts.check_matches(places)
        self._install_candidates(places)
        self.config.candidate_places = places.to_dict()
        self.config.levels = list(REGION_LEVELS if places.has_regions else PAPER_LEVELS)
        self.config.country_prompt_template = prompts.country_prompt_template
        self.config.city_prompt_template = prompts.city_prompt_template
        if places.has_regions:
            self.config.region_prompt_template = prompts.region_prompt_template
        self.country_head.weight.copy_(self._encode_prompts(prompts.countries, prompts.num_templates("country")))
        self.pending_city_prompts = {
            country: (tokens, prompts.num_templates("city")) for country, tokens in enumerate(prompts.cities)
        }
        self.pending_region_prompts = {
            country: (tokens, prompts.num_templates("region")) for country, tokens in enumerate(prompts.regions)
        }
        if build_all_city_heads:
            self.build_city_heads(list(self.pending_city_prompts))

    @torch.no_grad()
    def build_city_heads(self, countries: list[int]) -> bool:
        """Encode the city (and region) prompts of those `countries` whose heads below the country level are still
        pending (a no-op for the rest); whether any head was built."""
        pending = [country for country in countries if country in self.pending_city_prompts]
        if not pending:
            return False
        self._require_text_tower("build city heads")
        for country in pending:
            levels = [(self.city_head, self.city_rows, self.pending_city_prompts)]
            if self.uses_regions:
                levels.append((self.region_head, self.region_rows, self.pending_region_prompts))
            for head, padded_rows, prompts in levels:
                rows = padded_rows[country]
                rows = rows[rows >= 0].to(head.weight.device)
                # Under autocast (bf16 or fp16 evaluation in training) the text tower answers in the autocast dtype.
                embeddings = self._encode_prompts(*prompts.pop(country))
                head.weight[rows] = embeddings.to(head.weight.dtype)
        return True

    def restrict_countries(self, countries: list[str]) -> None:
        """Keep only the given candidate countries (names or ISO codes) with their regions and cities, subsetting the
        heads; needs no text tower."""
        kept = [self.candidate_places.country_index(name) for name in countries]
        if not kept:
            raise ValueError("restrict_countries needs at least one country.")
        places, city_rows, region_rows = self.candidate_places.select(kept)
        weights = {
            "country_head": self.country_head.weight.data[kept],
            "city_head": self.city_head.weight.data[city_rows],
        }
        if self.uses_regions:
            weights["region_head"] = self.region_head.weight.data[region_rows]
        pending = [
            {new: prompts[old] for new, old in enumerate(kept) if old in prompts}
            for prompts in (self.pending_city_prompts, self.pending_region_prompts)
        ]
        self._install_candidates(places)
        for name, weight in weights.items():
            getattr(self, name).weight.data.copy_(weight)
        self.pending_city_prompts, self.pending_region_prompts = pending
        self.config.candidate_places = places.to_dict()
        self.config.candidate_countries = places.country_names

    def _require_text_tower(self, purpose: str) -> None:
        if self.text_model is None:
            raise ValueError(f"This model was loaded with vision_only=True; it cannot {purpose} without a text tower.")

    def _encode_prompts(self, tokens: dict[str, torch.Tensor], num_templates: int = 1) -> torch.Tensor:
        """The rows of a probe head: normalised prompt embeddings times the logit scale. With a prompt ensembles
        (`num_templates` blocks of rows, one per template), each place's row is the normalised mean of its
        templates' normalised embeddings, as CLIP builds its ImageNet classifier."""
        device = self.logit_scale.device
        embeddings = self.get_text_features(**{key: value.to(device) for key, value in tokens.items()}).pooler_output
        embeddings = F.normalize(embeddings, dim=-1)
        if num_templates > 1:
            embeddings = F.normalize(embeddings.unflatten(0, (num_templates, -1)).mean(dim=0), dim=-1)
        return embeddings * self.logit_scale.exp()

    def forward(self, pixel_values: torch.FloatTensor, **kwargs) -> GeolocationOutput:
        r"""
        The paper's hierarchical decision: best country among all candidates, then (with a region level) the best
        region of that country, then the best city of that country (or region).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as the model's image processor prepares them.
        """
        image_embeds = self.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
        return self.locate_embeddings(F.normalize(image_embeds, dim=-1))

    def locate_embeddings(self, image_embeds: torch.Tensor) -> GeolocationOutput:
        """The hierarchical decision for L2-normalised image embeddings; callers that pool several views of one
        place (e.g. the headings of a panorama) average and renormalise embeddings, then call this."""
        if self.candidate_places is None:
            raise ValueError("This model has no candidate places; call `set_candidates` first.")
        country_logits = self.country_head(image_embeds)
        predicted_country = country_logits.argmax(dim=-1)
        # This may write weights inside a forward pass: the region and city heads of countries predicted for the
        # first time are encoded now, because a plain CLIP checkpoint would otherwise spend minutes encoding ~6000
        # city prompts on load while a session needs few of them. Saving builds the rest, so saved folders never do.
        city_logits, city_indices = self.score_cities(image_embeds, predicted_country)
        region_logits = region_indices = predicted_region = None
        if self.uses_regions:
            region_logits, region_indices = self.score_regions(image_embeds, predicted_country)
            slot = region_logits.argmax(dim=-1, keepdim=True)
            predicted_region = region_indices.gather(1, slot).squeeze(1)
            outside = self.city_region_slots[predicted_country.cpu()].to(slot.device) != slot
            city_logits = city_logits.masked_fill(outside, float("-inf"))
        predicted_city = city_indices.gather(1, city_logits.argmax(dim=-1, keepdim=True)).squeeze(1)
        return GeolocationOutput(
            country_logits=country_logits,
            city_logits=city_logits,
            city_indices=city_indices,
            predicted_country=predicted_country,
            predicted_city=predicted_city,
            predicted_coordinates=self.city_coordinates[predicted_city.cpu()].to(predicted_city.device),
            image_embeds=image_embeds,
            region_logits=region_logits,
            region_indices=region_indices,
            predicted_region=predicted_region,
        )

    def score_cities(
        self, image_embeds: torch.Tensor, countries: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Logits of each image against the cities of its country in `countries`, building pending heads first.

        Returns `(logits, city_indices)` of shape `(batch_size, max_cities_per_country)`: padding has index -1 and
        logit -inf.
        """
        return self._score_rows("city", image_embeds, countries)

    def score_regions(
        self, image_embeds: torch.Tensor, countries: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Logits of each image against the regions of its country in `countries` (a model with a region level),
        building pending heads first; shaped and padded as `score_cities`."""
        return self._score_rows("region", image_embeds, countries)

    def _head_logits(self, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The images' logits against every row of the city (and region) head: one matrix product, which the
        ranking reads country after country instead of multiplying again at each."""
        logits = {"city": image_embeds @ self.city_head.weight.T}
        if self.uses_regions:
            logits["region"] = image_embeds @ self.region_head.weight.T
        return logits

    def _score_rows(
        self, level: str, image_embeds: torch.Tensor, countries: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """The `level` ("city" or "region") logits of each image's country, padded. `forward` and the ranking both
        read them from the whole head's product, so that their numbers, and so their ties, are the same."""
        self.build_city_heads(countries.unique().tolist())
        padded_rows = self.city_rows if level == "city" else self.region_rows
        indices = padded_rows[countries.cpu()].to(countries.device)
        logits = self._head_logits(image_embeds)[level].gather(1, indices.clamp(min=0))
        return logits.masked_fill(indices < 0, float("-inf")), indices

    @torch.no_grad()
    def rank_places(self, outputs: GeolocationOutput, top_k: int = 1, decision: str = "greedy") -> RankedPlaces:
        """Top-k candidate cities per image under a decision rule, each answer carrying the number the rule sorts by.

        - `"greedy"` (the paper's, the default): countries by p(country), then regions by p(region | country), then
          cities by p(city | country or region); the first answer is the paper's decision (`outputs.predicted_city`).
        - `"joint"`: by p(country) * p(region | country) * p(city | ...).
        - `"expected_distance"`: the Bayes decision for distance-thresholded accuracy. Under the joint posterior over
          the `config.expected_distance_candidates` most probable cities (or `top_k`, if more), renormalised, each of
          them is ranked by its expected great-circle distance to the true place, smallest first.

        Countries are visited in order of p(country), and the search stops once the rule has its answers (greedy) or
        p(country) cannot beat the answers found (the others, since no city is more probable than its country), so
        only the heads that can matter are built.

        Returns:
            [`RankedPlaces`], each field of shape `(batch_size, k)` with `k = min(top_k, num_cities)`.
        """
        validate_decision(decision)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        places = self.candidate_places
        top_k = min(top_k, places.num_cities)
        wanted = top_k
        if decision == "expected_distance":
            wanted = min(max(top_k, self.config.expected_distance_candidates), places.num_cities)
        country_logits = outputs.country_logits.float()
        country_log_probs = country_logits.log_softmax(dim=-1)
        # Sorted on logits, not probabilities, so that ties break as `argmax` breaks them in `forward`.
        country_order = country_logits.argsort(dim=-1, descending=True, stable=True)
        batch = torch.arange(len(country_order), device=country_order.device)
        pool: dict[str, torch.Tensor] | None = None
        scores = None
        for step in range(places.num_countries):
            countries = country_order[:, step]
            if self.build_city_heads(countries.unique().tolist()) or scores is None:
                scores = self._level_scores(outputs.image_embeds)
            found = self._country_candidates(scores, countries, country_log_probs, step)
            pool = found if pool is None else {key: torch.cat([pool[key], found[key]], dim=1) for key in pool}
            # Keep the `wanted` best so far by the rule's key; padding (rows -1) sorts last.
            sort_key = pool["greedy_key"] if decision == "greedy" else -pool["joint"]
            order = sort_key.masked_fill(pool["rows"] < 0, float("inf")).argsort(dim=-1, stable=True)[:, :wanted]
            pool = {key: value.gather(1, order) for key, value in pool.items()}
            if pool["rows"].shape[1] < wanted or bool((pool["rows"] < 0).any()):
                continue  # not enough cities yet in some image
            if step + 1 == places.num_countries or decision == "greedy":
                break
            next_country = country_log_probs[batch, country_order[:, step + 1]]
            if bool((pool["joint"][:, -1] >= next_country).all()):
                break
        if decision == "expected_distance":
            pool, scores = self._by_expected_distance(pool)
        else:
            scores = (pool["city"] if decision == "greedy" else pool["joint"]).exp()
        return RankedPlaces(
            city_rows=pool["rows"][:, :top_k],
            scores=scores[:, :top_k],
            country_scores=pool["country"][:, :top_k].exp(),
            joint_probabilities=pool["joint"][:, :top_k].exp(),
            region_scores=pool["region"][:, :top_k].exp(),
        )

    @torch.no_grad()
    def place_probabilities(self, outputs: GeolocationOutput, city_rows: torch.LongTensor) -> dict[str, torch.Tensor]:
        """The zero-shot probabilities of given candidate cities, as `rank_places` gives them for its answers:
        `country_scores` (p(country)), `region_scores` (p(region | country), 1 without a region level) and
        `joint_probabilities`, each of the shape of `city_rows` (one row of cities per image; -1 entries, padding,
        get meaningless numbers). For callers that choose cities by another rule, such as a gallery's vote.
        """
        rows = city_rows.clamp(min=0)
        countries = self.city_countries[rows.cpu()].to(rows.device)
        self.build_city_heads(countries.unique().tolist())
        scores = self._level_scores(outputs.image_embeds)
        country = outputs.country_logits.float().log_softmax(dim=-1).gather(1, countries)
        region = torch.zeros_like(country)
        if self.uses_regions:
            region = scores["region"].gather(1, self.city_region_rows[rows.cpu()].to(rows.device))
        joint = country + region + scores["city"].gather(1, rows)
        return {"country_scores": country.exp(), "region_scores": region.exp(), "joint_probabilities": joint.exp()}

    def _level_scores(self, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of every city (and region) and their log-probabilities given their parent (the region, or the
        country; the country for a region), each of shape `(batch_size, rows)`.

        Computed once per ranking, for the whole table: each level's softmax within its parents is a few tensor
        operations, where one per visited country would cost, on a busy CPU, a thread wake-up each. Rows whose head
        is still pending hold whatever their head holds, which only ever reaches their own parent's numbers; the
        ranking reads a country's rows only once its heads are built.
        """
        places = self.candidate_places
        logits = {level: values.float() for level, values in self._head_logits(image_embeds).items()}
        device = image_embeds.device
        scores = {"city_logits": logits["city"]}
        if self.uses_regions:
            region_countries = self.region_countries.to(device)
            scores["region_logits"] = logits["region"]
            scores["region"] = _log_softmax_within(logits["region"], region_countries, places.num_countries)
            parents, num_parents = self.city_region_rows.to(device), places.num_regions
        else:
            parents, num_parents = self.city_countries.to(device), places.num_countries
        scores["city"] = _log_softmax_within(logits["city"], parents, num_parents)
        return scores

    def _country_candidates(
        self,
        scores: dict[str, torch.Tensor],
        countries: torch.LongTensor,
        country_log_probs: torch.Tensor,
        step: int,
    ) -> dict[str, torch.Tensor]:
        """Every city of each image's country in `countries` (the `step`-th most probable for that image), read from
        `_level_scores` as columns of shape `(batch_size, max_cities_per_country)`: `rows` (-1 for padding), the
        log-probabilities `country`, `region` (0 without a region level), `city` (given its region, or country) and
        `joint`, and `greedy_key`, the city's place in the greedy order (smaller first)."""
        rows = self.city_rows[countries.cpu()].to(countries.device)
        padding = rows < 0
        cities = rows.clamp(min=0)
        city_logits = scores["city_logits"].gather(1, cities).masked_fill(padding, float("-inf"))
        country = country_log_probs.gather(1, countries[:, None]).expand_as(city_logits)
        # Greedy order inside a country, as `forward` decides: by region logit (ties to the region listed first),
        # then by city logit (ties to the city listed first); each stable sort keeps the order of the one before.
        within = city_logits.argsort(dim=-1, descending=True, stable=True)
        if self.uses_regions:
            regions = self.city_region_rows[cities.cpu()].to(rows.device)
            region = scores["region"].gather(1, regions)
            slots = self.city_region_slots[countries.cpu()].to(rows.device).clamp(min=0)
            for key in (slots, -scores["region_logits"].gather(1, regions)):
                within = within.gather(1, key.gather(1, within).argsort(dim=-1, stable=True))
        else:
            region = torch.zeros_like(city_logits)
        city = scores["city"].gather(1, cities)
        position = torch.empty_like(within).scatter_(
            1, within, torch.arange(within.shape[1], device=within.device).expand_as(within)
        )
        greedy_key = step * within.shape[1] + position.double()
        return {
            "rows": rows,
            "country": country,
            "region": region.masked_fill(padding, float("-inf")),
            "city": city.masked_fill(padding, float("-inf")),
            "joint": (country + region + city).masked_fill(padding, float("-inf")),
            "greedy_key": greedy_key,
        }

    def _by_expected_distance(self, pool: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The pooled candidates of each image reordered by their expected great-circle distance in km (smallest
        first) under the joint posterior over the pool, renormalised, with those distances."""
        posterior = pool["joint"].softmax(dim=-1).double().cpu().numpy()
        coordinates = self.city_coordinates[pool["rows"].cpu()].numpy()
        expected = np.stack(
            [
                expected_distances_km(probabilities, points[:, 0], points[:, 1])
                for probabilities, points in zip(posterior, coordinates, strict=True)
            ]
        )
        expected = torch.from_numpy(expected).to(pool["joint"].device)
        order = expected.argsort(dim=-1, stable=True)
        return {key: value.gather(1, order) for key, value in pool.items()}, expected.gather(1, order)


def expected_distances_km(probabilities: np.ndarray, latitudes: np.ndarray, longitudes: np.ndarray) -> np.ndarray:
    """For each of n candidate places, the expected great-circle distance in km from it to the true place, when the
    true place is candidate j with probability `probabilities[j]`: the risk that the `"expected_distance"` decision
    minimises."""
    distances = great_circle_km(latitudes[:, None], longitudes[:, None], latitudes[None, :], longitudes[None, :])
    return distances @ probabilities


def _log_softmax_within(logits: torch.Tensor, groups: torch.LongTensor, num_groups: int) -> torch.Tensor:
    """`logits` of shape `(batch_size, rows)` as log-probabilities within each group of rows (`groups[i]` is row
    i's): a log-softmax per group, all groups at once."""
    index = groups.expand_as(logits)
    peak = logits.new_full((len(logits), num_groups), float("-inf")).scatter_reduce(1, index, logits, "amax")
    shifted = logits - peak.gather(1, index)
    mass = torch.zeros_like(peak).scatter_add(1, index, shifted.exp())
    return shifted - mass.log().gather(1, index)


def _padded_rows(groups: list[list[int]]) -> torch.LongTensor:
    """Rows of each group (cities or regions of each country) as a CPU tensor, padded with -1 to the widest."""
    padded = torch.full((len(groups), max(map(len, groups), default=0)), -1, dtype=torch.long, device="cpu")
    for index, rows in enumerate(groups):
        padded[index, : len(rows)] = torch.tensor(rows, dtype=torch.long, device="cpu")
    return padded


def _prompt_processor(source, config: StreetCLIPConfig, hub_kwargs: dict) -> StreetCLIPProcessor:
    """The checkpoint's processor with the configuration's templates, to build heads that match the configuration."""
    return StreetCLIPProcessor.from_pretrained(
        source,
        country_prompt_template=config.country_prompt_template,
        region_prompt_template=config.region_prompt_template,
        city_prompt_template=config.city_prompt_template,
        caption_template=config.caption_template,
        **hub_kwargs,
    )


def _vision_only(vision_only: bool | str, build_heads: bool, source) -> bool:
    """Resolve `from_pretrained`'s `vision_only`: `"auto"` drops the text tower exactly when no head needs building;
    `True` with heads to build is refused, naming `source`."""
    if vision_only == "auto":
        return not build_heads
    if vision_only not in (True, False):
        raise ValueError(f"vision_only must be True, False or 'auto', got {vision_only!r}.")
    if vision_only and build_heads:
        raise ValueError(
            f"{str(source)!r} has no prompt heads for the requested candidates, and vision_only=True leaves no text "
            "tower to build them; load with vision_only=False (or 'auto')."
        )
    return vision_only


__all__ = ["GeolocationOutput", "RankedPlaces", "StreetCLIPForGeolocation", "expected_distances_km"]
