"""Stage 4, merge: the run's experts merged into one adapter by every configured method.

The rules and the adapter reading live in the shared ``selma_ray.lora`` (serving merges on
demand with them too); this stage runs them (``stage``), picks ``merged`` (``validate``) and
offers the CLI ``python -m selma_ray.merge`` (``files``)."""
