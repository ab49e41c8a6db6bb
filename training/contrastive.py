"""CLIP's contrastive objective for synthetic-caption pretraining: both towers behind one forward, the batch gathered
across processes (N processes compute the loss of one with N times the batch), and the symmetric loss over
de-duplicated captions."""

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.distributed import group

# torch 2.13 deprecates torch.distributed.nn.functional.all_gather (open_clip's) for this differentiable gather.
from torch.distributed._functional_collectives import all_gather_single


class ContrastiveTowers(nn.Module):
    """Both towers of a CLIP model (or a peft model around one) behind one `forward`, so that DDP sees every
    parameter used in one call."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, and the logit scale; an empty batch gives no rows that still
        depend on every parameter, as DDP's gradient sync needs."""
        rows = len(pixel_values)
        image_embeds = self.clip.get_image_features(pixel_values=at_least_one_row(pixel_values)).pooler_output
        text_embeds = self.clip.get_text_features(
            input_ids=at_least_one_row(input_ids), attention_mask=at_least_one_row(attention_mask, fill=1)
        ).pooler_output
        image_embeds, text_embeds = (F.normalize(embeds[:rows], dim=-1) for embeds in (image_embeds, text_embeds))
        return image_embeds, text_embeds, self.clip.logit_scale.exp()


def at_least_one_row(batch: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """`batch`, or one stand-in row of `fill` when it is empty: CLIP cannot run on an empty batch, yet a process with
    no readable image still takes part in the step's collectives. The stand-in keeps activations finite (an
    all-masked text would not), so its zero gradients stay zero."""
    return batch if len(batch) else batch.new_full((1, *batch.shape[1:]), fill)


def gather_across_processes(accelerator: Accelerator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's rows from all processes in rank order; gradients flow back to each process's own rows, summed
    over processes (DDP's average then gives the one-process gradient of the global loss). Row counts may differ
    (unreadable images are dropped), so rows are padded for the collective and cut again."""
    if accelerator.num_processes == 1:
        return tensors
    counts = accelerator.gather(torch.tensor([len(tensors[0])], device=accelerator.device)).tolist()
    gathered = []
    for tensor in tensors:
        padded = accelerator.pad_across_processes(tensor, dim=0)
        pieces = all_gather_single(padded, 0, group.WORLD).reshape(len(counts), max(counts), *tensor.shape[1:])
        gathered.append(torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)]))
    return tuple(gathered)


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, caption_keys: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with each distinct caption one class. Images of one place share a caption, and
    one-hot targets would ask an image to prefer its own copy (a floor of log k for k copies): image to text
    classifies among distinct captions, text to image spreads a caption's target over the images carrying it."""
    if caption_keys.numel() == 0:
        # No readable row in the global batch: a zero that still reaches every parameter, as DDP needs.
        return (image_embeds.sum() + text_embeds.sum()) * logit_scale * 0.0
    _, caption_of_image = torch.unique(caption_keys, return_inverse=True)
    num_captions = int(caption_of_image.max()) + 1
    rows = torch.arange(len(caption_keys), device=caption_keys.device)
    # The first row carrying each distinct caption stands for its identical copies.
    first_row = torch.full((num_captions,), len(caption_keys), device=caption_keys.device)
    first_row = first_row.scatter_reduce(0, caption_of_image, rows, reduce="amin")
    logits = logit_scale * image_embeds @ text_embeds[first_row].T
    image_to_text = F.cross_entropy(logits, caption_of_image)
    images_of_caption = F.one_hot(caption_of_image, num_captions).T.to(logits.dtype)
    text_to_image = F.cross_entropy(logits.T, images_of_caption / images_of_caption.sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2
