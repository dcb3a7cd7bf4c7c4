"""Prices with bulk discounts.

A rule (threshold, rate) gives `rate` off the unit price when at least `threshold` units are
bought in one order. The best matching rule applies; rules are checked from the largest threshold.
"""

from .util import round_money

BULK_RULES = {
    "general": [(10, 0.05), (100, 0.10), (1000, 0.15)],
    "fasteners": [(50, 0.05), (500, 0.12), (5000, 0.20)],
    "tools": [(5, 0.03), (20, 0.08)],
}


def bulk_discount(category, quantity, rules=None):
    """The discount rate for `quantity` units of a category (0.0 when no rule applies)."""
    if quantity < 0:
        raise ValueError("quantity cannot be negative")
    table = (rules or BULK_RULES).get(category, BULK_RULES["general"])
    for threshold, rate in sorted(table, reverse=True):
        if quantity > threshold:
            return rate
    return 0.0


def price_for(item, quantity, rules=None):
    """The price of `quantity` units of `item`, bulk discount included, rounded to cents."""
    rate = bulk_discount(item.category, quantity, rules)
    return round_money(item.unit_price * quantity * (1 - rate))


def savings(item, quantity, rules=None):
    """How much the bulk discount saves on this order."""
    full = round_money(item.unit_price * quantity)
    return round_money(full - price_for(item, quantity, rules))
