"""Drive the real proxy with a bench session against the fake DeepSeek, then screenshot the dashboard
at a desktop and a phone width.

    python bench/dashboard_screenshot.py      # writes docs/dashboard.png and docs/dashboard-phone.png

Needs Debian's chromium (apt-get install chromium). Talks only to 127.0.0.1.
"""

import hashlib
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


def shoot(url, output, size):
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", "--user-data-dir=" + tempfile.mkdtemp(), "--window-size=%d,%d" % size,
                    "--virtual-time-budget=3000", "--screenshot=" + os.path.abspath(output), url],
                   check=True, capture_output=True, timeout=120)


PEOPLE = {"ana": "dsp-screenshot-ana-key", "ben": "dsp-screenshot-ben-key"}


def main(folder):
    fake = FakeDeepSeek(API_KEY).start()
    data = tempfile.mkdtemp(prefix="dashboard-")
    keys = os.path.join(data, "team.json")
    with open(keys, "w") as handle:
        json.dump({"keys": [{"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "usd_per_day": 5}
                            for name, key in PEOPLE.items()]}, handle)
    proxy = Proxy(fake.url, data, ["--system-wait", "5", "--no-persist-stats", "--system-min-seen", "1",
                                   "--no-system-payback", "--save-prepost-msgs", "--keys", keys])
    fake.responder = None
    try:
        for name, person in (("copilot", "ana"), ("aider", "ben")):
            session = SESSIONS[name]()
            fake.responder = scripted_responder(session)
            for request in session.requests:
                status, _, body = proxy.chat({"model": "gpt-5" if name == "copilot" else "claude-sonnet",
                                              "messages": request["messages"], "tools": request["tools"],
                                              "stream": True}, headers={"Authorization": "Bearer " + PEOPLE[person]})
                assert status == 200, body
        proxy.request("GET", "/v1/nothing")
        url = "http://127.0.0.1:%d/#key=%s" % (proxy.port, PEOPLE["ana"])
        shoot(url, os.path.join(folder, "dashboard.png"), (1280, 1750))
        shoot(url, os.path.join(folder, "dashboard-phone.png"), (390, 2900))
        stats = json.loads(proxy.request("GET", "/stats", headers={"Authorization": "Bearer " + PEOPLE["ana"]})[2])
        print(json.dumps({key: stats[key] for key in ("requests", "cost_usd", "savings")}, indent=1))
    finally:
        proxy.stop()
        fake.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs")
