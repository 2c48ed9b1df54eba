"""ImageNet facts that pretrained networks need: the input normalisation, and which of the
1000 ImageNet-1k classes belong to each CIFAR-10 class (for zero-shot CIFAR-10 predictions
of an ImageNet classifier, a check that weights really are ImageNet's).

Class indices are those of the standard ImageNet-1k order (the sorted WordNet ids,
``n01440764`` = 0 tench ... ``n15075141`` = 999 toilet tissue), the order every
torchvision/TensorFlow ImageNet classifier, EfficientNet-Lite0's included, predicts in.
"""

from __future__ import annotations

import numpy as np

#: Per-channel mean and std of ImageNet's training images, on pixels in [0, 1] (RGB).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

#: CIFAR-10 class (its label index and name) -> the ImageNet-1k classes that belong to it.
#: CIFAR-10's "automobile" excludes pickups and its "truck" means big trucks only, so the
#: pickup (717) is in neither. ImageNet has no deer: the deer-like antelopes stand in.
CIFAR10_FROM_IMAGENET = {
    (0, "airplane"): (404, 895, 908),  # airliner, warplane, wing
    (1, "automobile"): (407, 436, 468, 511, 609, 627, 656, 661, 751, 817),
    # ambulance, beach wagon, cab, convertible, jeep, limousine, minivan, Model T, racer, sports car
    (2, "bird"): tuple(range(7, 25)) + tuple(range(80, 101)) + tuple(range(127, 147)),
    # cock .. great grey owl; black grouse .. black swan; white stork .. albatross
    (3, "cat"): (281, 282, 283, 284, 285),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    (4, "deer"): (351, 352, 353),  # hartebeest, impala, gazelle
    (5, "dog"): tuple(range(151, 269)),  # Chihuahua .. Mexican hairless: the 118 dog breeds
    (6, "frog"): (30, 31, 32),  # bullfrog, tree frog, tailed frog
    (7, "horse"): (339, 603),  # sorrel, horse cart
    (8, "ship"): (403, 484, 510, 554, 625, 628, 724, 780, 814, 833, 871),
    # aircraft carrier, catamaran, container ship, fireboat, lifeboat, liner, pirate ship,
    # schooner, speedboat, submarine, trimaran
    (9, "truck"): (555, 569, 675, 864, 867),  # fire engine, garbage truck, moving van, tow truck, trailer truck
}


def normalize(images):
    """uint8 (or [0, 255] float) NHWC RGB images -> float32 ``(x / 255 - mean) / std``."""
    return ((np.asarray(images, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def cifar10_zero_shot(logits):
    """CIFAR-10 predictions (B,) from ImageNet logits (B, 1000): the CIFAR-10 class whose
    ImageNet classes hold the highest logit among all mapped classes (the unmapped ones are
    ignored, so every image gets one of the ten)."""
    logits = np.asarray(logits)
    scores = np.stack([logits[:, list(indices)].max(axis=1) for (_, _), indices in
                       sorted(CIFAR10_FROM_IMAGENET.items())], axis=1)
    return scores.argmax(axis=1)
