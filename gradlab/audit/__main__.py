"""``python -m gradlab.audit OUT [...]``: write a generated dataset with a known answer
(see :mod:`gradlab.audit.generate`). Auditing a file is ``gradlab audit FILE``."""

import sys

from gradlab.audit.generate import main

sys.exit(main(prog="python -m gradlab.audit"))
