"""``python -m selma_ray.merge``: merge any SD LoRAs (see ``selma_ray.merge.files``)."""

import sys

from selma_ray.merge.files import main

sys.exit(main())
