"""The Pixtral vision tower and multimodal projector (with its spatial patch merger), reused from
`transformers`: preprocessed images in, text-space image embeddings out, many images per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cluster.errors import CheckpointError, ConfigError, RequestError
from cluster.model.checkpoint import CheckpointReader
from cluster.model.image_rows import ImageKey, ImageRows

ImageInput = torch.Tensor | np.ndarray


class InvalidImageError(RequestError):
    """An image the encoder cannot take; `index` is its position in the request, `limit` the
    ImageLimits field it broke (None for a malformed image)."""

    def __init__(self, message: str, index: int | None = None, limit: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.limit = limit


class TooManyImagesError(InvalidImageError):
    """More images in one request than ImageLimits.max_images_per_request."""


class ImageTooLargeError(InvalidImageError):
    """An image with more pixels than ImageLimits.max_image_pixels."""


class ImageTokenMismatchError(InvalidImageError):
    """The prompt's [IMG] tokens do not line up with the images' embedding rows."""


@dataclass(frozen=True)
class ImageLimits:
    max_images_per_request: int = 8
    max_image_pixels: int = 1540 * 1540  # Pixtral's max_image_size (1540) per side, as preprocessed

    def __post_init__(self) -> None:
        for name in ("max_images_per_request", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ImageLimits.{name} must be a positive integer, got {value!r}")

    def check(self, images: Sequence[ImageInput]) -> None:
        if len(images) > self.max_images_per_request:
            raise TooManyImagesError(f"request has {len(images)} images; max_images_per_request is "
                                     f"{self.max_images_per_request}", limit="max_images_per_request")
        for i, image in enumerate(images):
            _, h, w = as_image_tensor(i, image).shape
            if h * w > self.max_image_pixels:
                raise ImageTooLargeError(f"image {i} is {h}x{w} = {h * w} pixels; max_image_pixels is "
                                         f"{self.max_image_pixels}", index=i, limit="max_image_pixels")


def as_image_tensor(index: int, image: ImageInput) -> torch.Tensor:
    """One preprocessed image as a float tensor [C, H, W]; InvalidImageError names it otherwise."""
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        what = f"{type(image).__name__} of dtype {image.dtype}" if hasattr(image, "dtype") else type(image).__name__
        # raw uint8 pixels would run unnormalized and give silently wrong embeddings
        raise InvalidImageError(f"image {index} is a {what}; expected a float [C, H, W] array or tensor "
                                "preprocessed (resized, normalized) by mistral-common", index=index)
    if image.dim() != 3:
        raise InvalidImageError(f"image {index} has shape {tuple(image.shape)}; expected [C, H, W]", index=index)
    return image


class VisionEncoder:
    """Pixtral tower + Mistral3 projector. `encode` runs every image given in one tower call (the
    images are zero-padded to one batch and cropped back by `image_sizes`, as transformers does);
    `calls` counts tower invocations."""

    def __init__(self, tower: nn.Module, projector: nn.Module, config: Any) -> None:
        self.tower = tower.eval().requires_grad_(False)
        self.projector = projector.eval().requires_grad_(False)
        self.config = config  # transformers Mistral3Config
        self.patch_size: int = config.vision_config.patch_size
        self.merge: int = config.spatial_merge_size
        self.channels: int = config.vision_config.num_channels
        self.hidden_size: int = config.text_config.hidden_size
        self.calls = 0

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> VisionEncoder:
        return cls.from_reader(CheckpointReader(model_dir))

    @classmethod
    def from_reader(cls, reader: CheckpointReader) -> VisionEncoder:
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
        from transformers.models.pixtral.configuration_pixtral import PixtralVisionConfig
        from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

        if reader.config.vision is None:
            raise CheckpointError(f"{reader.model_dir}: config.json has no vision_config; this model takes no images")
        config = reader.config.hf  # transformers' Mistral3Config
        if not isinstance(config.vision_config, PixtralVisionConfig):
            raise CheckpointError(f"{reader.model_dir}: vision_config is not a Pixtral tower's")
        tower = PixtralVisionModel(config.vision_config)
        projector = Mistral3MultiModalProjector(config)
        for module, name in ((tower, "vision_tower."), (projector, "multi_modal_projector.")):
            state = reader.vision_state_dict(name)  # fp8 weights come dequantized
            try:
                # assign keeps the checkpoint's dtype (bf16 stays bf16) and skips a copy
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                raise CheckpointError(f"{reader.model_dir}: {reader.vision_prefix}{name}* does not fit the config: "
                                      f"{e}") from e
        return cls(tower, projector, config)

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.get_parameter("patch_conv.weight").dtype

    @property
    def device(self) -> torch.device:
        return self.tower.get_parameter("patch_conv.weight").device

    def num_tokens(self, height: int, width: int) -> int:
        """Embedding rows of one preprocessed image of height x width pixels."""
        step = self.patch_size * self.merge
        return (height // step) * (width // step)

    def check(self, images: Sequence[ImageInput]) -> None:
        """Shape and value checks, naming the first bad image by its index in `images`."""
        step = self.patch_size * self.merge
        for i, image in enumerate(images):
            t = as_image_tensor(i, image)
            c, h, w = t.shape
            if c != self.channels or h < step or w < step or h % step or w % step:
                raise InvalidImageError(
                    f"image {i} has shape {tuple(t.shape)}; expected [{self.channels}, H, W] with H and W positive "
                    f"multiples of {step} (patch {self.patch_size} x spatial merge {self.merge})", index=i)
            if not bool(torch.isfinite(t).all()):
                raise InvalidImageError(f"image {i} has non-finite pixel values", index=i)

    def encode(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Embeddings [N_i, H_text] of each image, in order, from one tower call. The padded batch
        is built on the tower's device (each image copied once into its slot), in its dtype."""
        if not images:
            return []
        self.check(images)
        tensors = [as_image_tensor(i, im) for i, im in enumerate(images)]
        sizes = torch.tensor([t.shape[1:] for t in tensors], dtype=torch.long)  # [B, 2]
        hmax, wmax = (int(v) for v in sizes.max(dim=0).values)
        pixels = torch.zeros(len(tensors), self.channels, hmax, wmax, dtype=self.dtype,
                             device=self.device)  # [B, C, Hmax, Wmax]
        for b, t in enumerate(tensors):
            pixels[b, :, : t.shape[1], : t.shape[2]] = t.to(self.device, self.dtype)
        layer = self.config.vision_feature_layer
        with torch.no_grad():
            out = self.tower(pixels, image_sizes=sizes, output_hidden_states=True, return_dict=True)
            self.calls += 1
            if isinstance(layer, int):
                features = out.hidden_states[layer]  # [1, sum patches, Hv]
            else:
                features = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
            embeds = self.projector(features.squeeze(0), sizes)  # [sum N_i, H_text]
        return list(embeds.split([self.num_tokens(int(h), int(w)) for h, w in sizes]))


def image_rows(token_ids: Sequence[int] | torch.Tensor, image_embeds: Sequence[torch.Tensor],
               image_token_id: int | None, image_end_id: int | None = None,
               pixel_hashes: Sequence[bytes] = ()) -> ImageRows:
    """Where the images' embedding rows go in the prompt: the [IMG] positions, in order. With
    `image_end_id`, each image's rows must also fill exactly its own [IMG] run (up to its
    [IMG_END]), so swapped images are caught. A model without an image token takes no images.
    `pixel_hashes` (one per image, `pixel_hash`) key the prefix cache's blocks over each image."""
    if image_token_id is None:
        raise InvalidImageError("this model has no image token; it takes no images")
    ids = torch.as_tensor(token_ids, dtype=torch.long)  # [P]
    mask = ids == image_token_id  # [P]
    sizes = [int(e.shape[0]) for e in image_embeds]
    found = int(mask.sum())
    if found != sum(sizes):
        raise ImageTokenMismatchError(
            f"prompt has {found} image tokens (id {image_token_id}) but its {len(sizes)} image(s) give "
            f"{sum(sizes)} embedding rows {sizes}")
    if image_end_id is not None and sizes:
        ends = (ids == image_end_id).nonzero().flatten().tolist()
        if len(ends) != len(sizes):
            raise ImageTokenMismatchError(f"prompt has {len(ends)} image-end tokens (id {image_end_id}) for "
                                          f"{len(sizes)} image(s)")
        starts = [0, *(e + 1 for e in ends[:-1])]
        counts = [int(mask[s:e].sum()) for s, e in zip(starts, ends, strict=True)]
        for i, (got, want) in enumerate(zip(counts, sizes, strict=True)):
            if got != want:
                raise ImageTokenMismatchError(f"image {i} has {got} image tokens in the prompt but {want} "
                                              f"embedding rows", index=i)
    embeds = torch.cat(list(image_embeds)) if sizes else torch.empty(0, 0)
    positions = mask.nonzero().flatten()  # [N]
    keys: list[ImageKey] = []
    if pixel_hashes:
        if len(pixel_hashes) != len(sizes):
            raise ValueError(f"{len(pixel_hashes)} pixel hashes for {len(sizes)} images")
        at = 0
        for size, digest in zip(sizes, pixel_hashes, strict=True):
            if size:
                keys.append(ImageKey(int(positions[at]), int(positions[at + size - 1]) + 1, digest))
            at += size
    return ImageRows(positions, embeds, tuple(keys))

