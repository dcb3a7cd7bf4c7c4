"""The kept-open connection pool to DeepSeek: reuse, stale connections, an upstream restart, load."""

import unittest

from helpers import API_KEY, FakeDeepSeek, ProxyTestCase, chat_body, run_in_threads, wait_for
import deepseek_proxy as dp


class Pool(ProxyTestCase):
    def test_connections_are_reused(self):
        for _ in range(5):
            self.assertEqual(self.proxy.chat(chat_body())[0], 200)
        self.assertEqual(self.fake.connections, 1)
        self.assertEqual(self.proxy.state.upstream.opened, 1)

    def test_a_connection_the_server_closed_is_replaced_transparently(self):
        self.fake.close_idle = True
        for _ in range(4):
            self.assertEqual(self.proxy.chat(chat_body())[0], 200)
        self.assertEqual(len(self.fake.requests), 4, "no request was sent twice, none failed")
        self.assertEqual(self.fake.connections, 4)
        stats = self.proxy.request("GET", "/stats")[2]
        self.assertIn(b'"failed": 0', stats)

    def test_an_upstream_restart_costs_nothing(self):
        self.assertEqual(self.proxy.chat(chat_body())[0], 200)
        port = self.fake.server.server_address[1]
        self.fake.stop()
        restarted = FakeDeepSeek(API_KEY).start(port=port)
        self.addCleanup(restarted.stop)
        self.assertEqual(self.proxy.chat(chat_body())[0], 200)
        self.assertEqual(len(restarted.requests), 1)

    def test_concurrent_requests_and_a_bounded_idle_pool(self):
        proxy = self.start_proxy(["--upstream-pool-size", "4"])
        statuses = run_in_threads(lambda i: proxy.chat(chat_body(stream=i % 2 == 0))[0], 16)
        self.assertEqual(statuses, [200] * 16)
        self.assertTrue(wait_for(lambda: len(proxy.state.upstream.idle) <= 4))
        opened = proxy.state.upstream.opened
        for _ in range(4):
            self.assertEqual(proxy.chat(chat_body())[0], 200)
        self.assertEqual(proxy.state.upstream.opened, opened, "the idle connections served them")

    def test_upstream_url_must_be_http(self):
        for url in ("ftp://x", "not-a-url", "http://"):
            with self.assertRaises(ValueError):
                dp.UpstreamPool(url, 4)


if __name__ == "__main__":
    unittest.main()
