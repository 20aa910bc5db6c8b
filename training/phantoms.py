"""Public name kept: the module lives in :mod:`radflash.synthetic.phantoms` (the engine never imports training).

This name is the same module object (attributes, monkeypatching).
"""

import sys

from radflash.synthetic import phantoms as _module

sys.modules[__name__] = _module
