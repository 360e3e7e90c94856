#!/usr/bin/env python3
"""Container healthcheck: exit 0 when the labeler answers 200 on /readyz, 1 otherwise.

Standard library only (slim images have no curl). The port follows LABELER_PORT, so the
check stays right when a deployment moves the server; the bind address does not matter
inside the container, 127.0.0.1 always reaches it.
"""

import os
import sys
import urllib.error
import urllib.request

PATH = sys.argv[1] if len(sys.argv) > 1 else "/readyz"


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('LABELER_PORT', '8000')}{PATH}"
    # Straight to the server: an http_proxy in the container's environment (urllib sends even
    # loopback through it unless no_proxy names it) would answer for it, or not at all.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
