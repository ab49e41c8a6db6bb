"""StreetCLIP for geolocation: CLIP plus hierarchical linear probing over candidate countries and cities.

The probe heads are the normalised prompt embeddings times CLIP's logit scale, so `head(image_embedding)` is
exactly CLIP's zero-shot logit for each prompt. They are built once from the text tower and saved with the model;
a saved model then infers with the vision tower alone.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.utils import ModelOutput, logging

from .configuration_streetclip import (
    CANDIDATE_SETTINGS,
    GEOLOCATION_SETTINGS,
    HUB_KWARGS,
    PROMPT_SETTINGS,
    StreetCLIPConfig,
)
from .gazetteer import CandidatePlaces, resolve_country_name
from .processing_streetclip import CandidatePrompts, StreetCLIPProcessor


logger = logging.get_logger(__name__)

_HEAD_NAMES = ("country_head", "city_head")


@dataclass
class GeolocationOutput(ModelOutput):
    """
    Output of [`StreetCLIPForGeolocation`]: the paper's greedy hierarchical decision for each image.

    Args:
        country_logits (`torch.FloatTensor` of shape `(batch_size, num_countries)`):
            CLIP logits of the image against every candidate country prompt.
        city_logits (`torch.FloatTensor` of shape `(batch_size, max_cities_per_country)`):
            CLIP logits against the city prompts of each image's predicted country; `-inf` where that country has
            fewer cities than the widest one.
        city_indices (`torch.LongTensor` of shape `(batch_size, max_cities_per_country)`):
            Rows of the candidate table that `city_logits` refer to; `-1` for padding.
        predicted_country (`torch.LongTensor` of shape `(batch_size,)`):
            Row of the best country in `model.candidate_places`.
        predicted_city (`torch.LongTensor` of shape `(batch_size,)`):
            Row of the best city of that country in `model.candidate_places`.
        predicted_coordinates (`torch.DoubleTensor` of shape `(batch_size, 2)`):
            Latitude and longitude in degrees of the predicted city.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image embeddings, as the heads score them.
    """

    country_logits: torch.FloatTensor | None = None
    city_logits: torch.FloatTensor | None = None
    city_indices: torch.LongTensor | None = None
    predicted_country: torch.LongTensor | None = None
    predicted_city: torch.LongTensor | None = None
    predicted_coordinates: torch.DoubleTensor | None = None
    image_embeds: torch.FloatTensor | None = None


class RankedPlaces(NamedTuple):
    """Top-k candidate cities per image from [`StreetCLIPForGeolocation.rank_places`], each of shape
    `(batch_size, k)`: the first column is the paper's greedy decision, the rest follow joint probability."""

    city_rows: torch.LongTensor  # rows of `model.candidate_places`
    scores: torch.Tensor  # joint probability p(country) * p(city | country)
    country_scores: torch.Tensor  # p(country) of each answer's country


class StreetCLIPForGeolocation(CLIPModel):
    r"""
    CLIP with country and city probe heads: the StreetCLIP method of hierarchical zero-shot geolocation.

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
        """Size the heads for `places` and index its cities by country (heads are filled by the caller)."""
        self.candidate_places = places
        # Tokenised city prompts of countries whose city head is not built yet (see `build_city_heads`).
        self.pending_city_prompts: dict[int, dict[str, torch.Tensor]] = {}
        if places is None:
            # A plain CLIP checkpoint: no heads until `set_candidates` builds them from the text tower.
            self.country_head = self.city_head = None
            return
        device, dtype = self.visual_projection.weight.device, self.visual_projection.weight.dtype
        self.country_head = nn.Linear(
            self.projection_dim, places.num_countries, bias=False, device=device, dtype=dtype
        )
        self.city_head = nn.Linear(self.projection_dim, places.num_cities, bias=False, device=device, dtype=dtype)
        self.candidate_checksum = torch.tensor(places.checksum(), dtype=torch.long, device=device)
        # Index tables stay plain CPU tensors: they are data about the candidates, not weights to load or cast, and
        # float64 coordinates would move a city by kilometres in bfloat16.
        widest = max(len(rows) for rows in places.cities_by_country)
        self.city_rows = torch.full((places.num_countries, widest), -1, dtype=torch.long, device="cpu")
        for country, rows in enumerate(places.cities_by_country):
            self.city_rows[country, : len(rows)] = torch.tensor(rows, dtype=torch.long, device="cpu")
        self.city_coordinates = torch.tensor(
            list(zip(places.city_latitudes, places.city_longitudes, strict=True)), dtype=torch.float64, device="cpu"
        ).reshape(-1, 2)

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
                Geolocation settings of [`StreetCLIPConfig`] (`candidate_countries` by name or ISO code,
                `cities_per_country`, `min_city_population` and the templates), and everything
                [`~PreTrainedModel.from_pretrained`] accepts.
        """
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        settings = {key: kwargs.pop(key) for key in GEOLOCATION_SETTINGS & kwargs.keys()}
        if settings.get("candidate_countries") is not None:
            settings["candidate_countries"] = [resolve_country_name(name) for name in settings["candidate_countries"]]
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
        (`processor.candidate_prompts(places)`); the configuration records their templates. The country head is built
        at once (one prompt per country, cheap). City heads are built per country on first use, since encoding every
        city prompt costs far more than a typical inference session needs; pass `build_all_city_heads=True` (or save
        the model) to build them all now.
        """
        self._require_text_tower("build prompt heads")
        if not isinstance(prompts, CandidatePrompts):
            prompts = prompts.candidate_prompts(places)
        prompts.check_matches(places)
        self._install_candidates(places)
        self.config.candidate_places = places.to_dict()
        self.config.country_prompt_template = prompts.country_prompt_template
        self.config.city_prompt_template = prompts.city_prompt_template
        self.country_head.weight.copy_(self._encode_prompts(prompts.countries))
        self.pending_city_prompts = dict(enumerate(prompts.cities))
        if build_all_city_heads:
            self.build_city_heads(list(self.pending_city_prompts))

    @torch.no_grad()
    def build_city_heads(self, countries: list[int]) -> None:
        """Encode the city prompts of those `countries` whose city head is still pending (a no-op for the rest)."""
        pending = [country for country in countries if country in self.pending_city_prompts]
        if not pending:
            return
        self._require_text_tower("build city heads")
        for country in pending:
            rows = self.city_rows[country]
            rows = rows[rows >= 0].to(self.city_head.weight.device)
            # Under autocast (bf16 or fp16 evaluation in training) the text tower answers in the autocast dtype.
            embeddings = self._encode_prompts(self.pending_city_prompts.pop(country))
            self.city_head.weight[rows] = embeddings.to(self.city_head.weight.dtype)

    def restrict_countries(self, countries: list[str]) -> None:
        """Keep only the given candidate countries (names or ISO codes) and their cities, subsetting the heads;
        needs no text tower."""
        kept = [self.candidate_places.country_index(name) for name in countries]
        if not kept:
            raise ValueError("restrict_countries needs at least one country.")
        places, city_rows = self.candidate_places.select(kept)
        country_weights = self.country_head.weight.data[kept]
        city_weights = self.city_head.weight.data[city_rows]
        pending = {
            new: self.pending_city_prompts[old] for new, old in enumerate(kept) if old in self.pending_city_prompts
        }
        self._install_candidates(places)
        self.country_head.weight.data.copy_(country_weights)
        self.city_head.weight.data.copy_(city_weights)
        self.pending_city_prompts = pending
        self.config.candidate_places = places.to_dict()
        self.config.candidate_countries = places.country_names

    def _require_text_tower(self, purpose: str) -> None:
        if self.text_model is None:
            raise ValueError(f"This model was loaded with vision_only=True; it cannot {purpose} without a text tower.")

    def _encode_prompts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised prompt embeddings times the logit scale: the rows of a probe head."""
        device = self.logit_scale.device
        embeddings = self.get_text_features(**{key: value.to(device) for key, value in tokens.items()}).pooler_output
        return F.normalize(embeddings, dim=-1) * self.logit_scale.exp()

    def forward(self, pixel_values: torch.FloatTensor, **kwargs) -> GeolocationOutput:
        r"""
        The paper's hierarchical decision: best country among all candidates, then best city of that country.

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
        # This may write weights inside a forward pass: the city heads of countries predicted for the first time are
        # encoded now, because a plain CLIP checkpoint would otherwise spend minutes encoding ~6000 city prompts on
        # load while a session needs few of them. Saving builds the rest, so saved folders never do this.
        city_logits, city_indices = self.score_cities(image_embeds, predicted_country)
        predicted_city = city_indices.gather(1, city_logits.argmax(dim=-1, keepdim=True)).squeeze(1)
        return GeolocationOutput(
            country_logits=country_logits,
            city_logits=city_logits,
            city_indices=city_indices,
            predicted_country=predicted_country,
            predicted_city=predicted_city,
            predicted_coordinates=self.city_coordinates[predicted_city.cpu()].to(predicted_city.device),
            image_embeds=image_embeds,
        )

    def score_cities(
        self, image_embeds: torch.Tensor, countries: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Logits of each image against the cities of its country in `countries`, building pending heads first.

        Returns `(logits, city_indices)` of shape `(batch_size, max_cities_per_country)`: padding has index -1 and
        logit -inf.
        """
        self.build_city_heads(countries.unique().tolist())
        city_indices = self.city_rows[countries.cpu()].to(countries.device)
        weights = self.city_head.weight[city_indices.clamp(min=0)]
        logits = torch.einsum("bkd,bd->bk", weights, image_embeds)
        return logits.masked_fill(city_indices < 0, float("-inf")), city_indices

    @torch.no_grad()
    def rank_places(self, outputs: GeolocationOutput, top_k: int = 1) -> RankedPlaces:
        """Top-k candidate cities per image: first the paper's greedy decision, then the others ranked by joint
        probability p(country) * p(city | country).

        Countries are visited in order of p(country) and the search stops once p(country) cannot beat the k-th
        best joint probability found, so only the city heads that can matter are built.

        Returns:
            [`RankedPlaces`] of `(city_rows, scores, country_scores)`, each of shape `(batch_size, k)` with
            `k = min(top_k, num_cities)`.
        """
        top_k = min(top_k, self.candidate_places.num_cities)
        country_probs = outputs.country_logits.float().softmax(dim=-1)
        greedy_city_probs = outputs.city_logits.float().softmax(dim=-1).max(dim=-1).values
        city_rows, scores, country_scores = [], [], []
        for image, greedy_row in enumerate(outputs.predicted_city.tolist()):
            greedy_country_prob = country_probs[image, outputs.predicted_country[image]].item()
            ranked = [(greedy_country_prob * greedy_city_probs[image].item(), greedy_row, greedy_country_prob)]
            others: list[tuple[float, int, float]] = []
            needed = top_k - 1
            for country in country_probs[image].argsort(descending=True).tolist() if needed else []:
                country_prob = country_probs[image, country].item()
                if len(others) == needed and country_prob <= others[-1][0]:
                    break  # no city of this or any later country can enter the top k
                logits, rows = self.score_cities(
                    outputs.image_embeds[image : image + 1], torch.tensor([country], device=country_probs.device)
                )
                city_probs = logits.float().softmax(dim=-1)[0]
                for row, city_prob in zip(rows[0].tolist(), city_probs.tolist(), strict=True):
                    if row >= 0 and row != greedy_row:
                        others.append((country_prob * city_prob, row, country_prob))
                others.sort(key=lambda entry: entry[0], reverse=True)
                del others[needed:]
            ranked += others
            city_rows.append([row for _, row, _ in ranked])
            scores.append([score for score, _, _ in ranked])
            country_scores.append([country_score for _, _, country_score in ranked])
        device = outputs.country_logits.device
        return RankedPlaces(
            city_rows=torch.tensor(city_rows, dtype=torch.long, device=device),
            scores=torch.tensor(scores, device=device),
            country_scores=torch.tensor(country_scores, device=device),
        )


def _prompt_processor(source, config: StreetCLIPConfig, hub_kwargs: dict) -> StreetCLIPProcessor:
    """The checkpoint's processor with the configuration's templates, to build heads that match the configuration."""
    return StreetCLIPProcessor.from_pretrained(
        source,
        country_prompt_template=config.country_prompt_template,
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


__all__ = ["GeolocationOutput", "RankedPlaces", "StreetCLIPForGeolocation"]
