import sys

from meditron_jax.cli import main

sys.exit(main())
