"""CLIP's contrastive objective for synthetic-caption pretraining: the towers behind one forward, the batch gathered
across processes, and the symmetric loss over de-duplicated captions.

Every batch is a zero-shot classification over the places in it (the paper's point), so the batch is the global one:
image and text embeddings of all processes are gathered before the logits, and a run on N processes computes the
same loss as one process with N times the batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ContrastiveTowers(nn.Module):
    """Both towers of a CLIP model (or a peft model around one) behind a single `forward`, so that DDP sees every
    parameter used in one call; `StreetCLIPForGeolocation.forward` is the inference decision, not this."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, and the logit scale (the exponentiated temperature).

        An empty batch (every image of a process unreadable) gives no rows that still depend on every parameter,
        since DDP's gradient sync waits for each process to use them all.
        """
        rows = len(pixel_values)
        image_embeds = self.clip.get_image_features(pixel_values=at_least_one_row(pixel_values)).pooler_output
        text_embeds = self.clip.get_text_features(
            input_ids=at_least_one_row(input_ids), attention_mask=at_least_one_row(attention_mask, fill=1)
        ).pooler_output
        return (
            F.normalize(image_embeds[:rows], dim=-1),
            F.normalize(text_embeds[:rows], dim=-1),
            self.clip.logit_scale.exp(),
        )


def at_least_one_row(batch: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """`batch`, or one row of `fill` standing in for it when it has none, to be cut off from the outputs again: CLIP
    cannot run on an empty batch (its attention reshapes with -1), yet a process with nothing readable still has to
    take part in the collectives of a step. The stand-in must keep activations finite (an all-masked text would
    not), so that the zero gradients it passes back stay zero."""
    return batch if len(batch) else batch.new_full((1, *batch.shape[1:]), fill)


def gather_across_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor's rows over all processes, in rank order, keeping gradients to the local rows.

    Processes may hold different numbers of rows (unreadable images are dropped from their batch), so rows are
    padded to the largest count for the collective and the padding is cut off again. The gradient all-gather sums
    each process's gradients into the rows it owns; DDP then averages over processes, which gives exactly the
    one-process gradient of the global loss.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    device = tensors[0].device
    local_count = torch.tensor([tensors[0].shape[0]], device=device)
    counts = [torch.zeros_like(local_count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local_count)
    counts = [int(count) for count in counts]
    widest = max(counts)
    gathered = []
    for tensor in tensors:
        padded = F.pad(tensor, (0,) * (2 * (tensor.dim() - 1)) + (0, widest - tensor.shape[0]))
        if padded.requires_grad:
            pieces = _AllGatherWithGrad.apply(padded)
        else:
            pieces = [torch.zeros_like(padded) for _ in counts]
            dist.all_gather(pieces, padded)
        gathered.append(torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)]))
    return tuple(gathered)


class _AllGatherWithGrad(torch.autograd.Function):
    """`all_gather` whose backward hands each process the sum, over all processes, of the gradients of its rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return tuple(pieces)

    @staticmethod
    def backward(ctx, *piece_grads: torch.Tensor) -> torch.Tensor:
        # An all-reduce rather than a reduce-scatter, which the gloo backend (CPU) lacks.
        grads = torch.stack(piece_grads)
        dist.all_reduce(grads)
        return grads[dist.get_rank()]


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, caption_keys: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the distinct captions of the batch: identical captions are de-duplicated.

    Images of the same place get the same caption, and identical captions have identical embeddings. CLIP's one-hot
    targets would ask an image to prefer its own copy of the caption over an identical copy, which is impossible
    (the loss cannot fall below log k for k copies) and pushes the image away from its own place's text; and treating
    the copies as soft positives still counts a frequent place k times among every other image's negatives. So each
    distinct caption is one class, as in the paper's framing of a batch as a zero-shot classifier over the places in
    it: image to text is a classification among the distinct captions, and text to image spreads each caption's
    target evenly over the images that carry it.
    """
    if caption_keys.numel() == 0:
        # Every row of the global batch was unreadable: a zero that still reaches every parameter, as DDP needs.
        return (image_embeds.sum() + text_embeds.sum()) * logit_scale * 0.0
    _, caption_of_image = torch.unique(caption_keys, return_inverse=True)
    num_captions = int(caption_of_image.max()) + 1
    rows = torch.arange(len(caption_keys), device=caption_keys.device)
    # The first row carrying each distinct caption stands for all of its identical copies.
    first_row = torch.full((num_captions,), len(caption_keys), device=caption_keys.device)
    first_row = first_row.scatter_reduce(0, caption_of_image, rows, reduce="amin")
    logits = logit_scale * image_embeds @ text_embeds[first_row].T
    image_to_text = F.cross_entropy(logits, caption_of_image)
    images_of_caption = F.one_hot(caption_of_image, num_captions).T.to(logits.dtype)
    text_to_image = F.cross_entropy(logits.T, images_of_caption / images_of_caption.sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2
