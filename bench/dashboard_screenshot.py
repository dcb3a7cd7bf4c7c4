"""Drive the real proxy with a bench session against the fake DeepSeek, then screenshot the dashboard.

    python bench/dashboard_screenshot.py [docs/dashboard.png]

Needs Debian's chromium (apt-get install chromium). Talks only to 127.0.0.1.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from helpers import API_KEY, FakeDeepSeek, Proxy  # noqa: E402
from sessions import SESSIONS, scripted_responder  # noqa: E402


def main(output):
    fake = FakeDeepSeek(API_KEY).start()
    proxy = Proxy(fake.url, tempfile.mkdtemp(prefix="dashboard-"), ["--system-wait", "5", "--no-persist-stats"])
    session = SESSIONS["copilot"]()
    fake.responder = scripted_responder(session)
    try:
        for request in session.requests:
            status, _, body = proxy.chat({"model": "x", "messages": request["messages"], "tools": request["tools"],
                                          "stream": True})
            assert status == 200, body
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--user-data-dir=" + tempfile.mkdtemp(), "--window-size=1100,880",
                        "--virtual-time-budget=3000", "--screenshot=" + os.path.abspath(output),
                        "http://127.0.0.1:%d/" % proxy.port], check=True, capture_output=True, timeout=120)
        print(json.dumps({k: v for k, v in json.loads(proxy.request("GET", "/stats")[2]).items()
                          if not isinstance(v, (dict, list))}, indent=1))
    finally:
        proxy.stop()
        fake.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
