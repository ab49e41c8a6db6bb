"""Command-line arguments of `training/pretrain.py`: every training hyper-parameter, with its default and reason.

Parsed with `HfArgumentParser`, from the command line or from one YAML or JSON file holding the same names.
"""

from dataclasses import dataclass, field

from modeling_streetclip.app import DEFAULT_NUM_WORKERS
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.countries import read_country_list


def _check_at_least(arguments, names: tuple[str, ...], minimum: float) -> None:
    """Refuse, naming the option, any of `names` below `minimum` (an unset optional one is fine)."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and not value >= minimum:  # `not >=` also refuses NaN
            raise ValueError(f"--{name} must be at least {minimum}, got {value}.")


@dataclass
class ModelArguments:
    """Which checkpoint to continue from, which of its parameters train, and which candidates its heads hold."""

    model_name_or_path: str = field(
        metadata={"help": "A CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336) or a StreetCLIP folder."}
    )
    countries: str | None = field(
        default=None,
        metadata={
            "help": "A text file with one candidate country per line (names or ISO codes): the countries that "
            "evaluation chooses among and that the saved heads hold. Default: the model's own candidates (the "
            "paper's 193 for a plain CLIP checkpoint)."
        },
    )
    cities_per_country: int | None = field(
        default=None, metadata={"help": "Candidate cities per country in the heads; default: the model config's."}
    )
    freeze_text_tower: bool = field(
        default=False, metadata={"help": "Train without updating the text encoder and its projection."}
    )
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Train without updating the image encoder and its projection."}
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (peft) instead of the full weights; they are merged before saving."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 16 adapts CLIP well at a fraction of a percent."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r scales the update)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, against overfitting."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        metadata={"help": "Module names that get adapters: CLIP's attention projections in both towers."},
    )
    train_logit_scale: bool = field(
        default=True, metadata={"help": "Learn CLIP's temperature, as CLIP's own pretraining does."}
    )
    max_logit_scale: float = field(
        default=100.0, metadata={"help": "CLIP clamps its logit scale at 100 to keep training stable."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, more time."}
    )

    def __post_init__(self):
        _check_at_least(self, ("cities_per_country", "lora_r"), 1)
        if not self.max_logit_scale >= 1:
            # The temperature's logit scale is clamped to [1, max] (its logarithm to [0, log max]).
            raise ValueError(
                f"--max_logit_scale must be at least 1 (the logit scale is clamped to [1, max]; CLIP uses 100), "
                f"got {self.max_logit_scale}."
            )
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.use_lora and (self.freeze_text_tower or self.freeze_vision_tower):
            raise ValueError(
                "--use_lora already freezes the base weights; drop --freeze_text_tower/--freeze_vision_tower."
            )
        if self.freeze_text_tower and self.freeze_vision_tower:
            raise ValueError("--freeze_text_tower and --freeze_vision_tower together leave nothing to train.")

    def read_countries(self) -> list[str] | None:
        """The candidate countries listed in `countries` by name or ISO code (`#` comments allowed), resolved to the
        paper's names; an unknown one fails with close matches before any model loads."""
        return None if self.countries is None else read_country_list(self.countries)


@dataclass
class DataArguments:
    """Where the geo-tagged images come from, which columns hold what, and how captions are synthesised."""

    train_data: str = field(
        metadata={
            "help": "A `datasets` Hub id or local path (a saved dataset, or an image folder with metadata.csv: "
            "file_name,latitude,longitude[,city,region,country])."
        }
    )
    train_split: str = field(default="train", metadata={"help": "Split of --train_data to train on."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data, in the same formats."})
    eval_split: str = field(
        default="test", metadata={"help": "Split of --eval_data; a source with a single split uses that one."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the training data instead of downloading it first (needs --max_steps)."},
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Shuffle buffer of a streamed data set (a map-style one shuffles fully)."}
    )
    image_column: str = field(default="image", metadata={"help": "Column with the image (imagefolder's name)."})
    latitude_column: str = field(default="latitude", metadata={"help": "Column with the latitude in degrees."})
    longitude_column: str = field(default="longitude", metadata={"help": "Column with the longitude in degrees."})
    city_column: str = field(default="city", metadata={"help": "Optional column with the city (OSV-5M: city)."})
    region_column: str = field(
        default="region", metadata={"help": "Optional column with the first-level region (OSV-5M: region)."}
    )
    country_column: str = field(
        default="country", metadata={"help": "Optional column with the country name or ISO code (OSV-5M: codes)."}
    )
    caption_templates: list[str] | None = field(
        default=None,
        metadata={
            "help": "Caption templates over {city}, {region} and {country}, finest first; default: the model "
            "config's `caption_template`, the paper's `A Street View photo close to the town of {city} in the "
            "region of {region} in {country}.`"
        },
    )
    caption_template_probabilities: list[float] | None = field(
        default=None, metadata={"help": "Probability of each caption template (summing to 1); default: equal."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the caption map (datasets' num_proc)."}
    )
    dataloader_num_workers: int = field(
        # The rule inference uses too: at most 4, and never more than the cores this process may use.
        default=DEFAULT_NUM_WORKERS,
        metadata={
            "help": "DataLoader worker processes per training process: they decode the images. Default: 4, or the "
            "number of available cores where fewer."
        },
    )

    def __post_init__(self):
        _check_at_least(
            self, ("shuffle_buffer_size", "max_train_samples", "max_eval_samples", "preprocessing_num_workers"), 1
        )
        _check_at_least(self, ("dataloader_num_workers",), 0)

    def caption_mix(self, default_template: str, seed: int) -> CaptionMix:
        """The caption templates and their probabilities, validated; the model's caption template by default."""
        templates = tuple(self.caption_templates or [default_template])
        probabilities = self.caption_template_probabilities or [1.0 / len(templates)] * len(templates)
        return CaptionMix(templates, tuple(probabilities), seed)


@dataclass
class TrainingArguments:
    """Optimisation, checkpointing, evaluation and logging of the run."""

    output_dir: str = field(
        metadata={"help": "Where the final StreetCLIP folder, checkpoints/ and logs/ go."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and caption draws."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Images per process and step; the contrastive batch is this times processes."}
    )
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Images per process in evaluation."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimiser step (each micro-batch is its own contrastive batch)."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate (full fine-tuning)."})
    weight_decay: float = field(
        default=0.2, metadata={"help": "AdamW weight decay of matrices (CLIP's value); none on gains and biases."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (CLIP's value)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (CLIP's value, steadier than 0.999)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (CLIP's value)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name: cosine decay after the warmup."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps; overrides --warmup_ratio when > 0."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Warmup as a share of the optimiser steps: shields the pretrained weights."}
    )
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs over the training data, unless --max_steps."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimiser steps; overrides --num_train_epochs."})
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last incomplete batch: a tiny contrastive batch is a weak signal."}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16; default: the `accelerate config` choice."}
    )
    checkpointing_steps: int = field(default=500, metadata={"help": "Save the full training state every N steps."})
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints; default: keep all."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or `latest` for the newest complete one in output_dir/checkpoints."},
    )
    eval_steps: int = field(default=500, metadata={"help": "Evaluate on --eval_data every N steps and at the end."})
    eval_on_start: bool = field(
        default=False, metadata={"help": "Also evaluate before the first step, for a baseline."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    report_to: str = field(
        default="tensorboard", metadata={"help": "Accelerate trackers: tensorboard, wandb, all or none."}
    )
    record_sample_ids: bool = field(
        default=False,
        metadata={
            "help": "Write the row ids of every micro-batch per process to output_dir/sample_ids/, to audit "
            "data order and sharding."
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Publish the final folder with model_card/publish.py (card, code for trust_remote_code)."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo NAMESPACE/NAME for --push_to_hub (required with it)."}
    )

    def __post_init__(self):
        _check_at_least(
            self,
            (
                "per_device_train_batch_size",
                "per_device_eval_batch_size",
                "gradient_accumulation_steps",
                "num_train_epochs",
                "max_steps",
                "checkpointing_steps",
                "checkpoints_total_limit",
                "eval_steps",
                "logging_steps",
            ),
            1,
        )
        _check_at_least(self, ("warmup_steps", "weight_decay", "max_grad_norm"), 0)
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup_ratio is a share of the training steps, in [0, 1]; got {self.warmup_ratio}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError(
                "--push_to_hub needs --hub_model_id NAMESPACE/NAME, checked now rather than after training."
            )
