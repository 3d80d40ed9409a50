"""``python -m m2rec.integrations.recbole --dataset=ml-100k [--key=value ...]`` (see ``pipeline.main``)."""
import sys

from .pipeline import main

sys.exit(main())
