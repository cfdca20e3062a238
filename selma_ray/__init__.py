"""selma_ray."""
