"""Evaluation: FID, sFID, IS, precision and recall with guided-diffusion's definitions and a local FID Inception;
the Fashion-MNIST feature net and its FID for the CPU demo. The CLI is `python -m promoe.evaluate`."""

from promoe.eval.feature_net import (
    DEFAULT_FEATURE_NET,
    FeatureNet,
    conditional_accuracy,
    load_feature_net,
    pixel_features,
    pixel_fid,
    save_feature_net,
)
from promoe.eval.images import open_images
from promoe.eval.inception import FIDInceptionV3, check_state_dict, load_inception, resize_bilinear_tf1
from promoe.eval.metrics import (
    FixedStats,
    GaussianStats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from promoe.eval.reference import InceptionFeatures, inception_features, read_reference, save_reference

__all__ = [
    "DEFAULT_FEATURE_NET", "FIDInceptionV3", "FeatureNet", "FixedStats", "GaussianStats", "InceptionFeatures",
    "check_state_dict", "conditional_accuracy", "frechet_distance", "inception_features", "inception_score",
    "load_feature_net", "load_inception", "manifold_radii", "open_images", "pixel_features", "pixel_fid",
    "precision_recall",
    "read_reference", "resize_bilinear_tf1", "save_feature_net", "save_reference",
]
