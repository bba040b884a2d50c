"""Text-to-image benchmark (same code and flags as ``difforge bench``).

    python benchmarks/text_to_image.py --compare none,compile,difforge --output-json out.json

Run ``--help`` for all flags; the seed's spellings (``--compiler nexfort``, ``--base``,
``--n_steps``, ``--saved_image``, ``--run_multiple_resolutions true``) work too.
"""

from __future__ import annotations

import sys

from difforge.bench import main

if __name__ == "__main__":
    sys.exit(main())
