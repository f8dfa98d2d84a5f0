"""Model registry: numbered versions of named models, aliases, eval-gated promotion, rollback, audit log.

The semantics are MLflow's model registry (registered model → integer versions, named aliases such as
`production` and `candidate` pointing at one version each, version tags), kept in local files under
`$VIDIFFUSE_HOME/registry` so it works offline and without a tracking server.
"""

from vidiffuse.registry.model_registry import (
    ModelRegistry,
    ModelVersion,
    PromotionRefused,
    RegistryError,
)

__all__ = ["ModelRegistry", "ModelVersion", "PromotionRefused", "RegistryError"]
