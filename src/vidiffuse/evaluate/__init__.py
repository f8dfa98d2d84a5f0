"""Evaluation: FVD from I3D features and VBench-spirit temporal metrics."""

from vidiffuse.evaluate.fvd import (
    I3DFeatureExtractor,
    feature_stats,
    frechet_distance,
    fvd_from_features,
    preprocess_for_i3d,
    register_feature_model,
    registered_feature_models,
)
from vidiffuse.evaluate.temporal import (
    background_consistency,
    dynamic_degree,
    motion_smoothness,
    subject_consistency,
    temporal_flicker,
    temporal_metrics,
)

__all__ = [
    "I3DFeatureExtractor",
    "background_consistency",
    "dynamic_degree",
    "feature_stats",
    "frechet_distance",
    "fvd_from_features",
    "motion_smoothness",
    "preprocess_for_i3d",
    "register_feature_model",
    "registered_feature_models",
    "subject_consistency",
    "temporal_flicker",
    "temporal_metrics",
]
