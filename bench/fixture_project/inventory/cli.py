"""python -m inventory.cli report|quote FILE.csv [SKU=QTY ...]"""

import sys

from .io import load_csv
from .report import quote, stock_report


def parse_order(arguments):
    order = {}
    for argument in arguments:
        sku, _, quantity = argument.partition("=")
        if not quantity.isdigit():
            raise SystemExit("expected SKU=QUANTITY, got %r" % argument)
        order[sku] = order.get(sku, 0) + int(quantity)
    return order


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("report", "quote"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as handle:
        store = load_csv(handle.read())
    if argv[0] == "report":
        print(stock_report(store))
    else:
        print(quote(store, parse_order(argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
