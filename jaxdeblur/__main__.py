"""``python -m jaxdeblur`` runs the ``jaxdeblur`` command (`jaxdeblur.cli`)."""

import sys

from jaxdeblur.cli import main

if __name__ == "__main__":
    sys.exit(main())
