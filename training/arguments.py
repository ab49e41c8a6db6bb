"""Arguments of `training/pretrain.py`: every training hyper-parameter with its default and reason, parsed by
`HfArgumentParser` from the command line or from one YAML or JSON file."""

from dataclasses import Field, dataclass, field

from accelerate.tracking import filter_trackers
from data import PLACE_FIELDS

from modeling_streetclip.app import DEFAULT_NUM_WORKERS
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.countries import read_country_list


# transformers' schedulers that follow from the warmup and training steps alone: the others need arguments this script
# does not pass (min_lr, num_decay_steps) or step on a metric.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def _check_range(arguments, names: tuple[str, ...], minimum: float, below: float | None = None) -> None:
    """Refuse, naming the option, any of `names` below `minimum` or not below `below`, or NaN (`None` is fine)."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and not (value >= minimum and (below is None or value < below)):
            accepted = f"at least {minimum}" if below is None else f"in [{minimum}, {below})"
            raise ValueError(f"--{name} must be {accepted}, got {value}.")


def _help(text: str, **kwargs) -> Field:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelArguments:
    """Which checkpoint to continue from, which of its parameters train, and which candidates its heads hold."""

    model_name_or_path: str = _help("A CLIP checkpoint (openai/clip-vit-large-patch14-336) or a StreetCLIP folder.")
    countries: str | None = _help(
        "A text file with one candidate country per line (names or ISO codes): those that evaluation chooses among and "
        "the saved heads hold. Default: the model's own (the paper's 193 for a plain CLIP checkpoint).",
        default=None,
    )
    cities_per_country: int | None = _help("Cities per country in the heads; default: the config's.", default=None)
    freeze_text_tower: bool = _help("Train without updating the text encoder and its projection.", default=False)
    freeze_vision_tower: bool = _help("Train without updating the image encoder and its projection.", default=False)
    use_lora: bool = _help("Train LoRA adapters (peft), merged before saving, instead of all weights.", default=False)
    lora_r: int = _help("LoRA rank; 16 adapts CLIP well at a fraction of a percent.", default=16)
    lora_alpha: int = _help("LoRA scaling numerator (alpha / r scales the update).", default=32)
    lora_dropout: float = _help("Dropout on the LoRA input, against overfitting.", default=0.05)
    lora_target_modules: list[str] = _help(
        "Modules that get adapters: CLIP's attention projections in both towers.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    train_logit_scale: bool = _help(
        "Learn CLIP's temperature, as CLIP's own pretraining does (the --no_ form keeps it fixed).", default=True
    )
    max_logit_scale: float = _help("CLIP clamps its logit scale at 100 to keep training stable.", default=100.0)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass: less memory.", default=False)

    def __post_init__(self):
        _check_range(self, ("cities_per_country", "lora_r", "max_logit_scale"), 1)
        _check_range(self, ("lora_dropout",), 0, below=1)
        if self.use_lora and (self.freeze_text_tower or self.freeze_vision_tower):
            raise ValueError(
                "--use_lora already freezes the base weights; drop --freeze_text_tower/--freeze_vision_tower."
            )
        if self.freeze_text_tower and self.freeze_vision_tower:
            raise ValueError("--freeze_text_tower and --freeze_vision_tower together leave nothing to train.")

    def read_countries(self) -> list[str] | None:
        """The countries listed in `countries`, resolved to the paper's names; an unknown one fails with close
        matches before any model loads."""
        if self.countries is None:
            return None
        try:
            return read_country_list(self.countries)
        except OSError as error:  # its own message names the file, not the option
            raise type(error)(f"cannot read --countries {self.countries!r}: {error.strerror or error}.") from None


@dataclass
class DataArguments:
    """Where the geo-tagged images come from, which columns hold what, and how captions are synthesised."""

    train_data: str = _help(
        "A `datasets` Hub id or local path (a saved dataset, or an image folder with metadata.csv: "
        "file_name,latitude,longitude[,city,region,country])."
    )
    train_split: str = _help("Split of --train_data to train on.", default="train")
    eval_data: str | None = _help("Held-out data, in the same formats.", default=None)
    eval_split: str = _help("Split of --eval_data; a source with a single split uses that one.", default="test")
    streaming: bool = _help("Stream the training data instead of downloading it (needs --max_steps).", default=False)
    shuffle_buffer_size: int = _help("Shuffle buffer of a streamed data set (others shuffle fully).", default=10_000)
    image_column: str = _help("Column with the image (imagefolder's name).", default="image")
    latitude_column: str = _help("Column with the latitude in degrees.", default="latitude")
    longitude_column: str = _help("Column with the longitude in degrees.", default="longitude")
    city_column: str = _help("Optional column with the city (OSV-5M: city).", default="city")
    region_column: str = _help("Optional column with the first-level region (OSV-5M: region).", default="region")
    country_column: str = _help("Optional column with a country name or ISO code (OSV-5M: codes).", default="country")
    caption_templates: list[str] | None = _help(
        "Caption templates over {city}, {region} and {country}, finest first; default: the config's, the paper's.",
        default=None,
    )
    caption_template_probabilities: list[float] | None = _help(
        "Probability of each caption template (summing to 1); default: equal.", default=None
    )
    max_train_samples: int | None = _help("Train on the first N rows only.", default=None)
    max_eval_samples: int | None = _help("Evaluate on the first N rows only.", default=None)
    preprocessing_num_workers: int | None = _help("Processes for the caption map (datasets' num_proc).", default=None)
    dataloader_num_workers: int = _help(
        "DataLoader workers per process, decoding images: 4, or the cores if fewer.", default=DEFAULT_NUM_WORKERS
    )

    def __post_init__(self):
        _check_range(
            self, ("shuffle_buffer_size", "max_train_samples", "max_eval_samples", "preprocessing_num_workers"), 1
        )
        _check_range(self, ("dataloader_num_workers",), 0)
        if self.caption_templates is not None or self.caption_template_probabilities is not None:
            try:  # CaptionMix's own checks, and those of its fields on rows of no data; the model's template stands in
                self.caption_mix("{country}", seed=0).captions({name: [] for name in PLACE_FIELDS}, [])
            except ValueError as error:
                raise ValueError(f"bad --caption_templates or --caption_template_probabilities: {error}") from None

    def caption_mix(self, default_template: str, seed: int) -> CaptionMix:
        """The caption templates and their probabilities, validated; the model's caption template by default."""
        templates = tuple(self.caption_templates or [default_template])
        probabilities = self.caption_template_probabilities or [1.0 / len(templates)] * len(templates)
        return CaptionMix(templates, tuple(probabilities), seed)


@dataclass
class TrainingArguments:
    """Optimisation, checkpointing, evaluation and logging of the run."""

    output_dir: str = _help("Where the final StreetCLIP folder, checkpoints/ and logs/ go.")
    seed: int = _help("Seed of initialisation, data order and caption draws.", default=42)
    per_device_train_batch_size: int = _help("Images per process and step (times processes: the batch).", default=32)
    per_device_eval_batch_size: int = _help("Images per process in evaluation.", default=64)
    gradient_accumulation_steps: int = _help("Micro-batches per step, each its own contrastive batch.", default=1)
    learning_rate: float = _help("Peak AdamW learning rate (full fine-tuning).", default=1e-5)
    weight_decay: float = _help("AdamW weight decay of matrices (CLIP's); none on gains and biases.", default=0.2)
    adam_beta1: float = _help("AdamW beta1 (CLIP's value).", default=0.9)
    adam_beta2: float = _help("AdamW beta2 (CLIP's value, steadier than 0.999).", default=0.98)
    adam_epsilon: float = _help("AdamW epsilon (CLIP's value).", default=1e-6)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables clipping.", default=1.0)
    lr_scheduler_type: str = _help("transformers scheduler name: cosine decay after the warmup.", default="cosine")
    warmup_steps: int = _help("Linear warmup steps; overrides --warmup_ratio when > 0.", default=0)
    warmup_ratio: float = _help("Warmup as a share of the steps: shields the pretrained weights.", default=0.05)
    num_train_epochs: int = _help("Epochs over the training data, unless --max_steps.", default=1)
    max_steps: int | None = _help("Optimiser steps; overrides --num_train_epochs.", default=None)
    dataloader_drop_last: bool = _help(
        "Drop a short last batch, since a tiny contrastive batch is weak (the --no_ form keeps it).", default=True
    )
    mixed_precision: str | None = _help("no, fp16 or bf16; default: the `accelerate config` choice.", default=None)
    checkpointing_steps: int = _help("Save the full training state every N steps.", default=500)
    checkpoints_total_limit: int | None = _help("Keep only the newest N checkpoints; default: all.", default=None)
    resume_from_checkpoint: str | None = _help(
        "A checkpoint folder, or `latest` for the newest complete one in output_dir/checkpoints.", default=None
    )
    eval_steps: int = _help("Evaluate on --eval_data every N steps and at the end.", default=500)
    eval_on_start: bool = _help("Also evaluate before the first step, for a baseline.", default=False)
    logging_steps: int = _help("Log the training loss every N steps.", default=10)
    report_to: str = _help("Accelerate trackers: tensorboard, wandb, all or none.", default="tensorboard")
    record_sample_ids: bool = _help("Write each batch's row ids to output_dir/sample_ids/ (audits).", default=False)
    push_to_hub: bool = _help("Publish the final folder with model_card/publish.py.", default=False)
    hub_model_id: str | None = _help("Hub repo NAMESPACE/NAME for --push_to_hub (required with it).", default=None)

    def __post_init__(self):
        batches = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
        steps = ("num_train_epochs", "max_steps", "checkpointing_steps", "eval_steps", "logging_steps")
        _check_range(self, (*batches, *steps, "checkpoints_total_limit"), 1)
        _check_range(self, ("warmup_steps", "weight_decay", "max_grad_norm"), 0)
        _check_range(self, ("adam_beta1", "adam_beta2"), 0, below=1)
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup_ratio is a share of the training steps, in [0, 1]; got {self.warmup_ratio}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(
                f"--lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler_type!r}."
            )
        if self.report_to != "none":
            try:  # accelerate's check of the names, before the Accelerator starts
                filter_trackers(self.report_to, logging_dir=self.output_dir)
            except ValueError as error:
                raise ValueError(f"--report_to {self.report_to!r}: {error}") from None
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError(
                "--push_to_hub needs --hub_model_id NAMESPACE/NAME, checked now rather than after training."
            )
