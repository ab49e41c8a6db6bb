"""StreetCLIP: CLIP plus hierarchical linear probing over candidate countries, optional regions, and cities. Each
head's rows are normalised prompt embeddings times CLIP's logit scale (CLIP's zero-shot logits), built once from the
text tower and saved, so that a saved model infers with the vision tower alone."""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPModel
from transformers import initialization as init
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging

from .candidates import CandidatePlaces
from .configuration_streetclip import (
    CANDIDATE_SETTINGS,
    GEOLOCATION_SETTINGS,
    HUB_KWARGS,
    PAPER_LEVELS,
    PROMPT_SETTINGS,
    REGION_LEVELS,
    StreetCLIPConfig,
)
from .countries import resolve_country_names
from .geodesy import unit_vectors
from .processing_streetclip import CandidatePrompts, StreetCLIPProcessor


logger = logging.get_logger(__name__)

# Keyword arguments of `from_pretrained` that are configuration attributes, but that the loading applies itself.
_LOADING_INSTRUCTIONS = ("dtype", "torch_dtype", "attn_implementation", "experts_implementation")
# Prompts per text-tower call when heads are built: bounds the activations' memory, yet runs each call at full speed.
_PROMPTS_PER_BATCH = 1024
_CANDIDATE_BUFFERS = ("candidate_checksum", "city_countries", "region_countries", "city_regions")


@dataclass
class GeolocationOutput(ModelOutput):
    """Output of [`StreetCLIPForGeolocation`]: every level's logits and the paper's greedy hierarchical decision.

    Args:
        logits (`(batch_size, num_cities)`): Log joint probability of every city, as `config.id2label` names them.
        country_logits, city_logits, region_logits (`torch.FloatTensor`): CLIP logits against each level's prompts.
        predicted_country, predicted_city, predicted_region (`(batch_size,)`): Rows in `model.candidate_places` of
            the best country, then of the best region and city within it; `predicted_coordinates` the city's degrees.
        image_embeds, hidden_states, attentions: L2-normalised image embeddings, and the vision tower's when asked.
    """

    logits: torch.FloatTensor | None = None
    country_logits: torch.FloatTensor | None = None
    city_logits: torch.FloatTensor | None = None
    predicted_country: torch.LongTensor | None = None
    predicted_city: torch.LongTensor | None = None
    predicted_coordinates: torch.DoubleTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    region_logits: torch.FloatTensor | None = None
    predicted_region: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class StreetCLIPForGeolocation(CLIPModel):
    """CLIP with country (optionally region) and city probe heads. Loads a plain CLIP checkpoint, building its heads
    from the text tower (`from_pretrained("geolocal/StreetCLIP", candidate_countries=["FR", "JP"])`), or a folder
    saved by this class; `model.candidate_places.city_labels[outputs.predicted_city]` names the answers."""

    config_class = StreetCLIPConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: StreetCLIPConfig, vision_only: bool = False):
        super().__init__(config)  # CLIP's towers, then `post_init` below adds the heads
        if vision_only:  # the heads already hold everything the text tower would contribute at inference
            self.text_model = self.text_projection = None
            self._keys_to_ignore_on_load_unexpected.update({r"^text_model\.", r"^text_projection\."})

    def post_init(self) -> None:
        """Add the heads of the configuration's table before transformers initialises the weights."""
        places = self.config.candidate_places
        self._install_candidates(None if places is None else CandidatePlaces.from_dict(places))
        super().post_init()

    def _install_candidates(self, places: CandidatePlaces | None) -> None:
        """Size the heads for `places` (with regions, a region head too) and index its rows by parent."""
        self.candidate_places = places
        self.country_head = self.region_head = self.city_head = None
        for name in [name for name in _CANDIDATE_BUFFERS if hasattr(self, name)]:
            delattr(self, name)
        # Saved with the heads, whose rows follow the table: a table changed apart from them is refused on load.
        self.register_buffer("candidate_checksum", None)
        if places is None:  # a plain CLIP checkpoint, until `set_candidates`
            return
        device, dtype = self.visual_projection.weight.device, self.visual_projection.weight.dtype
        head = partial(nn.Linear, self.projection_dim, bias=False, device=device, dtype=dtype)
        self.country_head, self.city_head = head(places.num_countries), head(places.num_cities)
        if places.has_regions:
            self.region_head = head(places.num_regions)
        # Integer buffers follow the model's device, never its dtype; `_init_weights` refills them on the meta device.
        for name, value in _candidate_buffers(places).items():
            self.register_buffer(name, value.to(device), persistent=name == "candidate_checksum")
        # Float64 CPU tensors outside the buffers: bfloat16 would move a city by kilometres.
        coordinates = list(zip(places.city_latitudes, places.city_longitudes, strict=True))
        self.city_coordinates = torch.tensor(coordinates, dtype=torch.float64, device="cpu").reshape(-1, 2)
        self.city_vectors = torch.from_numpy(unit_vectors(*self.city_coordinates.T.numpy()))  # for `within_km`
        self.config.id2label = dict(enumerate(places.city_labels))
        self.config.label2id = {label: row for row, label in self.config.id2label.items()}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.constant_(self.logit_scale, self.config.logit_scale_init_value)  # which CLIP's own leaves out
            if self.candidate_places is not None:
                for name, value in _candidate_buffers(self.candidate_places).items():
                    init.copy_(getattr(self, name), value)

    @property
    def uses_regions(self) -> bool:
        """Whether this model decides a first-level region between the country and the city."""
        return self.region_head is not None

    def get_input_embeddings(self) -> nn.Module:
        """The vision tower's patch embedding: this model's input is pixels."""
        return self.vision_model.embeddings.patch_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vision_model.embeddings.patch_embedding = value

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
        r"""Load a plain CLIP checkpoint or a folder saved by this class.

        Args:
            candidates ([`CandidatePlaces`], *optional*): Replace the candidate places, rebuilding the heads; by
                default a saved folder's own, or GeoNames'.
            processor ([`StreetCLIPProcessor`], *optional*): Renders the prompts when heads are built; by default the
                checkpoint's, with the config's templates.
            vision_only (`bool` or `"auto"`, defaults to `False`): Skip the text tower, which only builds heads;
                `"auto"` skips it when nothing needs building.
            kwargs: [`StreetCLIPConfig`] settings and overrides, and what [`~PreTrainedModel.from_pretrained`] takes.
        """
        path = pretrained_model_name_or_path
        source = str(path)
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        settings = {key: kwargs.pop(key) for key in GEOLOCATION_SETTINGS & kwargs.keys()}
        if settings.get("candidate_countries") is not None:
            settings["candidate_countries"] = resolve_country_names(settings["candidate_countries"])
        if "levels" in settings:
            settings["levels"] = list(settings["levels"])  # the PAPER_LEVELS and REGION_LEVELS tuples, say
        config = kwargs.pop("config", None)
        if config is None:
            # Configuration attributes among the keyword arguments override the checkpoint's, as for every
            # transformers model; loading instructions and Hub arguments go on to the weights.
            loading = {key: kwargs.pop(key) for key in _LOADING_INSTRUCTIONS if key in kwargs}
            config, kwargs = AutoConfig.from_pretrained(path, return_unused_kwargs=True, **kwargs)
            kwargs |= hub_kwargs | loading
        config = StreetCLIPConfig.from_checkpoint(path, config)
        config, changed = config.with_geolocation_settings(**settings)
        if candidates is None and (config.candidate_places is None or changed & CANDIDATE_SETTINGS):
            candidates = CandidatePlaces.from_config(config)
        build_heads = candidates is not None or bool(changed & PROMPT_SETTINGS)
        if vision_only == "auto":
            vision_only = not build_heads
        elif vision_only not in (True, False):
            raise ValueError(f"vision_only must be True, False or 'auto', got {vision_only!r}.")
        elif vision_only and build_heads:
            raise ValueError(
                f"{source!r} has no prompt heads for the requested candidates, and vision_only=True leaves no text "
                "tower to build them; load with vision_only=False (or 'auto')."
            )
        load_processor = partial(StreetCLIPProcessor.from_pretrained, path, **config.text_settings(), **hub_kwargs)
        if build_heads and processor is None:  # before the weights, so that a folder without one fails fast
            processor = load_processor()
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            path, *model_args, config=config, vision_only=vision_only, output_loading_info=True, **kwargs
        )
        if build_heads:
            model.set_candidates(candidates or model.candidate_places, processor)
        elif model._lacks_saved_heads(loading_info, source):
            reason = "the weights came as a state_dict, with no folder to read a processor from."
            if processor is None and path is not None:
                try:
                    processor = load_processor()
                except OSError as error:
                    reason = str(error)
            if processor is None:  # as transformers leaves a missing weight: initialised, with a warning
                logger.warning(
                    f"{source!r} lacks its prompt heads, and they cannot be rebuilt: {reason} Until they are, its "
                    "answers are meaningless; rebuild them with "
                    "`model.set_candidates(model.candidate_places, StreetCLIPProcessor.from_pretrained(...))`."
                )
            else:
                model.set_candidates(model.candidate_places, processor)
        return (model, loading_info) if output_loading_info else model

    def _lacks_saved_heads(self, loading_info: dict, source: str) -> bool:
        """Whether the heads must be built; saved heads without their table's checksum, or another one, are refused."""
        missing = {key.split(".")[0] for key in loading_info["missing_keys"]}
        if missing & {"country_head", "region_head", "city_head"}:
            if self.text_model is None:
                raise ValueError(
                    f"{source!r} lacks its prompt heads, and vision_only=True leaves no text tower to rebuild them; "
                    "load with vision_only=False."
                )
            return True
        if "candidate_checksum" in missing or int(self.candidate_checksum) != self.candidate_places.checksum():
            raise ValueError(
                f"{source!r}: the candidate table in its config.json (`candidate_places`) is not the one its "
                "prompt heads were built for (their checksums differ, or it has none), so answers would name the "
                "wrong places. The folder was edited or assembled from two saves: save it again from the model that "
                "built the heads, or rebuild them with "
                "`from_pretrained(..., candidates=CandidatePlaces.from_dict(...))`."
            )
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, heads and candidate table, with the code for `trust_remote_code=True`."""
        # Without its text tower the folder would reload with a random one, and heads rebuilt from it would be noise.
        self._require_text_tower("be saved")
        # `register_for_auto_class` records one Auto class per model; the image-classification pipeline needs this one.
        reference = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        auto_map = getattr(self.config, "auto_map", None) or {}
        self.config.auto_map = {**auto_map, "AutoModelForImageClassification": reference}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def to(self, *args, **kwargs):
        """`nn.Module.to`, refusing to cast a quantized model: its layers compute in the dtype they were loaded for."""
        dtype = kwargs.get("dtype", next((arg for arg in args if isinstance(arg, torch.dtype)), None))
        if getattr(self, "is_quantized", False) and dtype not in (None, self.dtype):
            raise ValueError(
                f"This model is quantized ({self.config.quantization_config.quant_method}) and computes in "
                f"{self.dtype}; it cannot be cast to {dtype}. Load the unquantized model with dtype={dtype} instead."
            )
        return super().to(*args, **kwargs)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def _require_text_tower(self, purpose: str) -> None:
        if self.text_model is None:
            raise ValueError(f"This model was loaded with vision_only=True; it cannot {purpose} without a text tower.")

    @torch.no_grad()
    def set_candidates(self, places: CandidatePlaces, prompts: StreetCLIPProcessor | CandidatePrompts) -> None:
        """Replace the candidate places, building heads from `prompts` (a processor or its `candidate_prompts`)."""
        self._require_text_tower("build prompt heads")
        if not isinstance(prompts, CandidatePrompts):
            prompts = prompts.candidate_prompts(places)
        prompts.check_matches(places)
        self._install_candidates(places)
        self.config.candidate_places = places.to_dict()
        self.config.levels = list(REGION_LEVELS if places.has_regions else PAPER_LEVELS)
        for name in PROMPT_SETTINGS - (set() if places.has_regions else {"region_prompt_template"}):
            setattr(self.config, name, getattr(prompts, name))  # the templates the heads encode
        levels = [
            (self.country_head, [prompts.countries], [range(places.num_countries)], "country"),
            (self.city_head, prompts.cities, places.cities_by_country, "city"),
        ]
        if places.has_regions:
            levels.append((self.region_head, prompts.regions, places.regions_by_country, "region"))
        groups = [
            (tokens, prompts.num_templates(level)) for _, token_groups, _, level in levels for tokens in token_groups
        ]
        embeddings = iter(self._encode_prompt_groups(groups))
        for head, token_groups, row_groups, _ in levels:
            rows = torch.tensor([row for group in row_groups for row in group], dtype=torch.long)
            weight = torch.cat([next(embeddings) for _ in token_groups])
            head.weight[rows.to(head.weight.device)] = weight.to(head.weight.dtype)

    def _encode_prompt_groups(self, groups: list[tuple[dict[str, torch.Tensor], int]]) -> list[torch.Tensor]:
        """Head rows of each group `(tokens, num_templates)`: normalised embeddings times the logit scale, an
        ensemble's averaged. Prompts are sorted by length, each call cut to its longest (the tower pools at the end).
        """
        width = max(tokens["input_ids"].shape[1] for tokens, _ in groups)
        input_ids, attention_mask = (
            torch.cat([F.pad(tokens[key], (0, width - tokens[key].shape[1]), value=value) for tokens, _ in groups])
            for key, value in (("input_ids", self.config.text_config.pad_token_id or 0), ("attention_mask", 0))
        )
        lengths, sizes = attention_mask.sum(dim=1), [len(tokens["input_ids"]) for tokens, _ in groups]
        device = self.logit_scale.device
        features = torch.empty(len(input_ids), self.projection_dim, dtype=torch.float32, device=device)
        for batch in lengths.argsort(descending=True, stable=True).split(_PROMPTS_PER_BATCH):
            longest = int(lengths[batch].max())
            tokens = {"input_ids": input_ids[batch, :longest], "attention_mask": attention_mask[batch, :longest]}
            encoded = self.get_text_features(**{k: v.to(device) for k, v in tokens.items()}, return_dict=True)
            # Under autocast (bf16 or fp16 evaluation in training) the text tower answers in the autocast dtype.
            features[batch.to(device)] = F.normalize(encoded.pooler_output.float(), dim=-1)
        scale, ensembles = self.logit_scale.exp().float(), zip(features.split(sizes), groups, strict=True)
        return [
            scale * (F.normalize(b.unflatten(0, (n, -1)).mean(0), dim=-1) if n > 1 else b) for b, (_, n) in ensembles
        ]

    def restrict_countries(self, countries: list[str]) -> None:
        """Keep only `countries` (names or ISO codes) subsetting the heads (per call: `country_rows`)."""
        kept = self.candidate_places.country_rows(countries)
        if not kept:
            raise ValueError("restrict_countries needs at least one country.")
        places, city_rows, region_rows = self.candidate_places.select(kept)
        rows = {"country_head": kept, "city_head": city_rows, "region_head": region_rows}
        heads = {name: getattr(self, name).weight for name in rows if getattr(self, name) is not None}
        if offloaded := [name for name, weight in heads.items() if weight.device.type == "meta"]:
            raise ValueError(
                f"restrict_countries cannot subset {offloaded[0]}: it is offloaded (device_map), so its weights are "
                "not in memory. Load without offloading the heads, or restrict each call with "
                "`decisions.rank_places(model, outputs, country_rows=...)`."
            )
        weights = {name: weight.data[rows[name]] for name, weight in heads.items()}
        self._install_candidates(places)
        for name, weight in weights.items():
            getattr(self, name).weight.data.copy_(weight)
        self.config.candidate_places = places.to_dict()
        self.config.candidate_countries = places.country_names

    @can_return_tuple
    def forward(self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]) -> GeolocationOutput:
        r"""
        Every level's logits and the paper's decision: the best country, its best region (with a region level), then
        the best city. Shapes depend on the batch only, so it exports; `decisions.rank_answers` ranks more answers.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as the model's image processor prepares them.
        """
        # Set on this model's configuration, they must reach the vision tower, whose configuration is its own.
        asked = ("output_hidden_states", "output_attentions")
        kwargs = {name: True for name in asked if getattr(self.config, name)} | kwargs
        vision = self.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs)
        outputs = self.locate_embeddings(F.normalize(vision.pooler_output, dim=-1))
        return GeolocationOutput(**outputs, hidden_states=vision.hidden_states, attentions=vision.attentions)

    def locate_embeddings(self, image_embeds: torch.Tensor) -> GeolocationOutput:
        """`forward` from L2-normalised image embeddings (those of a panorama's views can be averaged first)."""
        if self.candidate_places is None:
            raise ValueError("This model has no candidate places; call `set_candidates` first.")
        # Heads called as modules, so that Accelerate's hooks bring offloaded weights in.
        country_logits, city_logits = self.country_head(image_embeds), self.city_head(image_embeds)
        region_logits = self.region_head(image_embeds) if self.uses_regions else None
        # The greedy decision as argmaxes over masked rows: ties go to the row listed first, as in the ranking.
        predicted_country = country_logits.argmax(dim=-1)
        city_parents, predicted_parent, predicted_region = self.city_countries, predicted_country, None
        if self.uses_regions:
            outside = self.region_countries != predicted_country[:, None]
            predicted_region = region_logits.masked_fill(outside, float("-inf")).argmax(dim=-1)
            city_parents, predicted_parent = self.city_regions, predicted_region
        outside = city_parents != predicted_parent[:, None]
        predicted_city = city_logits.masked_fill(outside, float("-inf")).argmax(dim=-1)
        return GeolocationOutput(
            logits=self.log_probabilities(country_logits, region_logits, city_logits)["joint"],
            country_logits=country_logits,
            city_logits=city_logits,
            predicted_country=predicted_country,
            predicted_city=predicted_city,
            predicted_coordinates=self.city_coordinates[predicted_city.cpu()].to(predicted_city.device),
            image_embeds=image_embeds,
            region_logits=region_logits,
            predicted_region=predicted_region,
        )

    def log_probabilities(
        self,
        country_logits: torch.Tensor,
        region_logits: torch.Tensor | None,
        city_logits: torch.Tensor,
        country_rows: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each city's log-probabilities: `country` (over `country_rows`), `region` and `city` (each within its
        parent), and their sum `joint`."""
        places, country_logits = self.candidate_places, country_logits.float()
        if country_rows is not None:
            allowed = torch.zeros(places.num_countries, dtype=torch.bool, device=country_logits.device)
            allowed[list(country_rows)] = True
            country_logits = country_logits.masked_fill(~allowed, float("-inf"))
        country = country_logits.log_softmax(dim=-1)[:, self.city_countries]
        if self.uses_regions:
            region = _log_softmax_within(region_logits.float(), self.region_countries, places.num_countries)
            region = region[:, self.city_regions]
            city = _log_softmax_within(city_logits.float(), self.city_regions, places.num_regions)
        else:
            region = torch.zeros_like(country)
            city = _log_softmax_within(city_logits.float(), self.city_countries, places.num_countries)
        return {"country": country, "region": region, "city": city, "joint": country + region + city}


def _candidate_buffers(places: CandidatePlaces) -> dict[str, torch.Tensor]:
    """A table's buffers, on the CPU: its checksum and each city's (and region's) parent."""
    values = {"candidate_checksum": places.checksum(), "city_countries": places.city_countries}
    if places.has_regions:
        values |= {"region_countries": places.region_countries, "city_regions": places.city_regions}
    return {name: torch.tensor(value, dtype=torch.long, device="cpu") for name, value in values.items()}


def _log_softmax_within(logits: torch.Tensor, groups: torch.LongTensor, num_groups: int) -> torch.Tensor:
    """Log-softmax of `logits` `(batch_size, rows)` within each group of rows (`groups[i]` is row i's)."""
    index = groups.expand_as(logits)
    peak = logits.new_full((logits.shape[0], num_groups), float("-inf")).scatter_reduce(1, index, logits, "amax")
    shifted = logits - peak.gather(1, index)
    mass = torch.zeros_like(peak).scatter_add(1, index, shifted.exp())
    return shifted - mass.log().gather(1, index)


# `save_pretrained` writes `auto_map` and copies the code, for `trust_remote_code=True` without this package.
StreetCLIPForGeolocation.register_for_auto_class("AutoModel")

__all__ = ["GeolocationOutput", "StreetCLIPForGeolocation"]
