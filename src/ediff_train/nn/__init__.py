"""Network backbones: the ADM-style text U-Net and its attention and embedding layers."""

from ediff_train.nn.unet import TextUNet

__all__ = ["TextUNet"]
