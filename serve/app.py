"""Ray Serve entry point from a checkout: ``serve run serve.app:build_app run_dir=...``.

The application lives in the installed package (``selma_ray.serving.app``), so it also works
where selma_ray is installed rather than checked out; ``serve/config.yaml`` names it directly.
"""

from selma_ray.serving.app import api, build_app

__all__ = ["api", "build_app"]
