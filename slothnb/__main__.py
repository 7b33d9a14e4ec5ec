"""``python -m slothnb ...`` is the ``slothnb`` console script."""
import sys

from slothnb.cli import main

if __name__ == "__main__":
    sys.exit(main())
