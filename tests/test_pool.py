"""The kept-open connection pool to DeepSeek: reuse, stale connections, an upstream restart, load."""

import http.server
import json
import threading
import unittest

from helpers import API_KEY, FakeDeepSeek, Proxy, ProxyTestCase, chat_body, run_in_threads, wait_for
import deepseek_proxy as dp


def dp_proxy(test, upstream):
    proxy = Proxy(upstream, test.data_dir, test.proxy_args)
    test.addCleanup(proxy.stop)
    return proxy


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

    def test_a_stream_read_to_its_end_keeps_its_connection(self):
        # a stream sent with Content-Length (http.client's readline leaves such a response open at its
        # end) or chunked: either way the connection serves the next request
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
            {"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        events = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"

        class Upstream(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            chunked = False

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if Upstream.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events))
                else:
                    self.send_header("Content-Length", str(len(events)))
                    self.end_headers()
                    self.wfile.write(events)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        proxy = dp_proxy(self, "http://127.0.0.1:%d" % server.server_address[1])
        for chunked in (False, True):
            Upstream.chunked = chunked
            for _ in range(3):
                status, _, data = proxy.request("POST", "/v1/chat/completions", chat_body(stream=True))
                self.assertEqual(status, 200)
                self.assertIn(b"[DONE]", data)
            self.assertEqual(proxy.state.upstream.opened, 1, "chunked" if chunked else "Content-Length")

    def test_upstream_url_must_be_http(self):
        for url in ("ftp://x", "not-a-url", "http://"):
            with self.assertRaises(ValueError):
                dp.UpstreamPool(url, 4)


if __name__ == "__main__":
    unittest.main()
