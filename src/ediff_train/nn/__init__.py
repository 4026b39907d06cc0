"""Network backbones: the ADM-style text U-Net (base), the Efficient U-Net (super-resolution),
and their attention and embedding layers."""

from ediff_train.nn.efficient_unet import EfficientUNet
from ediff_train.nn.unet import TextUNet

__all__ = ["EfficientUNet", "TextUNet"]
