"""``python -m diffusion_mdp`` = the ``diffusion-mdp`` command."""

import sys

from diffusion_mdp.agents.cli import main

sys.exit(main())
