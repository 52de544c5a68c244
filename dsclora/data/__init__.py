"""Image files, MATLAB-compatible bicubic resizing and numpy <-> torch layout helpers."""
from .imresize import imresize, mod_crop
from .io import (
    IMAGE_SUFFIXES, ImageReadError, LoadedImage, image_to_tensor, list_images, load_image, save_image,
    tensor_to_image,
)
from .pairing import PairingError, pair_lr_files

__all__ = [
    "imresize", "mod_crop", "load_image", "save_image", "list_images", "image_to_tensor", "tensor_to_image",
    "LoadedImage", "ImageReadError", "IMAGE_SUFFIXES", "PairingError", "pair_lr_files",
]
