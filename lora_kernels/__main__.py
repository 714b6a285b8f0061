"""``python -m lora_kernels`` runs ``lora-bench`` (see :mod:`lora_kernels.cli`)."""

import sys

from .cli import main

sys.exit(main())
