"""Former name of the merge plan cache, now in :mod:`lora_kernels.ops.merge.tables` (beside the job table whose
device copies it caches), kept as an alias.

``import lora_kernels.ops.merge_plan`` gives that very module, not a copy, so that what its users read and set
(``merge_plan.set_enabled(False)``, ``merge_plan.info()``, a test's patch of ``merge_plan.store``) is the cache
the merge ops use.
"""

import sys

from .merge import tables

sys.modules[__name__] = tables
