"""Dataset readers, image loading and the shared transform."""

from .images import (
    DataError,
    array_to_tensor,
    image_to_tensor,
    list_images,
    load_image,
    load_image_array,
    load_index_mask,
    load_mask,
    pil_to_rgb_array,
)
from .readers import GOOD, IndexMaskDataset, MVTecDataset, Sample, SampleRef, find_mvtec_categories, open_dataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, Preprocess, build_transform, normalize, resize

__all__ = [
    "DataError", "array_to_tensor", "image_to_tensor", "list_images", "load_image", "load_image_array", "load_index_mask",
    "load_mask", "pil_to_rgb_array", "GOOD", "IndexMaskDataset", "MVTecDataset", "Sample", "SampleRef",
    "find_mvtec_categories", "open_dataset", "IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "Preprocess",
    "build_transform", "normalize", "resize",
]
