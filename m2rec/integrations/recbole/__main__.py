"""``python -m m2rec.integrations.recbole --dataset=ml-100k [--key=value ...]`` (see ``run.main``)."""
import sys

from .run import main

sys.exit(main())
