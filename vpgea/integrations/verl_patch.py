"""Importing this module puts ``vpgea.integrations.verl.linear_cross_entropy`` in verl's place (``patch_verl()``).

For verl's ``actor_rollout_ref.model.external_lib`` (or ``VERL_USE_EXTERNAL_MODULES``), which verl imports in each
worker before it builds the model: ``actor_rollout_ref.model.external_lib=vpgea.integrations.verl_patch``.
"""

from vpgea.integrations.verl import patch_verl

REPLACED = patch_verl()
