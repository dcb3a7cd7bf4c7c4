"""Plain-text stock reports."""

from .pricing import price_for
from .util import plural


def stock_report(store, low=10):
    """A report of every item, its quantity and value, and what runs low."""
    lines = ["Stock report: %s" % plural(len(store), "item"), ""]
    width = max([len(item.label) for item in store.find("")] + [10])
    for item in store.find(""):
        count = store.quantity(item.sku)
        lines.append("%-*s %6d  %10.2f" % (width, item.label, count, item.unit_price * count))
    lines.append("")
    low_rows = store.low_stock(low)
    if low_rows:
        lines.append("Running low (under %d):" % low)
        lines.extend("  %s: %d" % (item.label, count) for item, count in low_rows)
    else:
        lines.append("Nothing runs low.")
    lines.append("Total value: %.2f" % store.value())
    return "\n".join(lines)


def quote(store, order):
    """A price quote for an order {sku: quantity}, bulk discounts included."""
    lines, total = [], 0.0
    for sku, quantity in sorted(order.items()):
        item = store.get(sku)
        price = price_for(item, quantity)
        total += price
        lines.append("%-12s x%-5d %10.2f" % (sku, quantity, price))
    lines.append("%-19s %10.2f" % ("total", total))
    return "\n".join(lines)
