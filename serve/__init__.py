"""Ray Serve application of selma_ray: ``serve run serve/config.yaml``."""
