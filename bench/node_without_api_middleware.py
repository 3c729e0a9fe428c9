"""Run the voxanode daemon with its API middleware removed, for `bench/api.py --without-api-middleware`.

The node then serves its routes with no request ids, token check, rate limit, error
envelopes for aiohttp's own errors, or request statistics. This shows what aiohttp
and the handlers cost on their own. It is a measuring aid and never a way to run a node.

    python bench/node_without_api_middleware.py [voxanode options]
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import voxanode.api.app  # noqa: E402

voxanode.api.app.MIDDLEWARES = ()

from voxanode.daemon import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
