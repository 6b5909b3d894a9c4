"""Docker HEALTHCHECK: exit 0 when GET /healthz inside this container answers 200, else 1 (with the reason)."""

import os
import sys
import urllib.request

URL = f"http://127.0.0.1:{os.environ.get('BITFIT_PORT', '8000')}/healthz"

# An empty ProxyHandler: a proxy set in the container's environment must not receive this request.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(URL, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure means unhealthy; Docker shows this line in `docker inspect`
    print(f"{URL}: {exc}", file=sys.stderr)
    sys.exit(1)
