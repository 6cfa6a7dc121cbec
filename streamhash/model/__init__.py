"""Hash networks: backbone + hash head giving u = tanh(F(x)), and their serialisation."""

from streamhash.model.hashnet import HashNet, HashNetConfig, images_to_tensor

__all__ = ["HashNet", "HashNetConfig", "images_to_tensor"]
