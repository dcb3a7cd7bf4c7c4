"""Small helpers shared by the modules."""

from decimal import ROUND_HALF_UP, Decimal


def round_money(amount):
    """Round to cents, halves up (as a till does), as a float."""
    return float(Decimal(str(amount)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def plural(count, word):
    """'1 item', '2 items'."""
    return "%d %s%s" % (count, word, "" if count == 1 else "s")


def chunks(sequence, size):
    """The sequence in lists of at most `size`."""
    if size < 1:
        raise ValueError("size must be positive")
    return [list(sequence[i:i + size]) for i in range(0, len(sequence), size)]
