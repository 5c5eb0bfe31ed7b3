"""``python -m onnxopt``: see ``onnxopt.cli``."""

import sys

from onnxopt.cli import main

sys.exit(main())
