"""Stage 6, evaluation. The scorer names live here, light to import: the config schema reads
them, ``selma_ray.eval.scorers`` implements them."""

# scorer key -> what its column is called in tables and plots
LABELS = {
    "clip": "CLIPScore",
    "pick": "PickScore",
    "dsg": "DSG",
    "tifa": "TIFA",
    "image_reward": "ImageReward",
    "hps": "HPS v2",
}
