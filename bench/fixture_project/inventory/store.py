"""A store: items and how many of each are on the shelves, what is reserved for open orders, and
the history of every change, from which reorders are suggested."""

import collections
import threading
import time

from .models import Item

Movement = collections.namedtuple("Movement", "when sku change reason")


class OutOfStock(Exception):
    """Raised when an order asks for more units than the store has."""

    def __init__(self, sku, wanted, available):
        super().__init__("%s: %d wanted, %d available" % (sku, wanted, available))
        self.sku, self.wanted, self.available = sku, wanted, available


class Store:
    """Items by SKU with their quantities. Safe to use from several threads."""

    def __init__(self, clock=time.time):
        self._items = {}
        self._quantities = {}
        self._reserved = {}  # sku -> {order id: units held for that order}
        self._suppliers = {}  # sku -> (supplier name, lead time in days, units per pack)
        self._history = []  # Movement, oldest first
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._items)

    def __contains__(self, sku):
        return sku in self._items

    def add(self, item, quantity=0):
        """Add an item (or more of one already kept)."""
        if not isinstance(item, Item):
            raise TypeError("expected an Item, got %r" % type(item).__name__)
        if quantity < 0:
            raise ValueError("quantity cannot be negative")
        with self._lock:
            self._items[item.sku] = item
            self._quantities[item.sku] = self._quantities.get(item.sku, 0) + quantity

    def get(self, sku):
        """The item with this SKU (KeyError when there is none)."""
        return self._items[sku]

    def quantity(self, sku):
        return self._quantities.get(sku, 0)

    def take(self, sku, quantity):
        """Remove `quantity` units from the shelves; OutOfStock when there are not enough."""
        with self._lock:
            available = self._quantities.get(sku, 0)
            if quantity > available:
                raise OutOfStock(sku, quantity, available)
            self._quantities[sku] = available - quantity
            self._record(sku, -quantity, "sale")
        return self._items[sku]

    def restock(self, sku, quantity, reason="delivery"):
        """Put `quantity` more units of a kept item on the shelves."""
        if sku not in self._items:
            raise KeyError(sku)
        if quantity <= 0:
            raise ValueError("a restock adds at least one unit")
        with self._lock:
            self._quantities[sku] = self._quantities.get(sku, 0) + quantity
            self._record(sku, quantity, reason)

    def reserve(self, sku, quantity, order):
        """Hold `quantity` units for an order until it ships or is cancelled."""
        if quantity <= 0:
            raise ValueError("a reservation holds at least one unit")
        with self._lock:
            free = self._available(sku)
            if quantity > free:
                raise OutOfStock(sku, quantity, free)
            held = self._reserved.setdefault(sku, {})
            held[order] = held.get(order, 0) + quantity

    def release(self, sku, order):
        """Cancel an order's reservation; returns how many units it held."""
        with self._lock:
            held = self._reserved.get(sku, {})
            units = held.pop(order, 0)
            if not held:
                self._reserved.pop(sku, None)
            return units

    def ship(self, sku, order):
        """Take the units an order reserved off the shelves; returns how many."""
        with self._lock:
            units = self._reserved.get(sku, {}).pop(order, 0)
            if not units:
                raise KeyError("order %r holds nothing of %s" % (order, sku))
            if not self._reserved[sku]:
                del self._reserved[sku]
            self._quantities[sku] -= units
            self._record(sku, -units, "shipped " + str(order))
            return units

    def reserved(self, sku):
        """Units of an item held for open orders."""
        return sum(self._reserved.get(sku, {}).values())

    def available(self, sku):
        """Units of an item that can still be sold or reserved."""
        with self._lock:
            return self._available(sku)

    def _available(self, sku):
        on_shelves = self._quantities.get(sku, 0)
        held = sum(self._reserved.get(sku, {}).values())
        return on_shelves + held

    def _record(self, sku, change, reason):
        self._history.append(Movement(self._clock(), sku, change, reason))

    def history(self, sku=None, since=None):
        """The movements of one item (or of all), oldest first, from `since` on."""
        return [movement for movement in self._history
                if (sku is None or movement.sku == sku) and (since is None or movement.when >= since)]

    def remove(self, sku):
        """Stop keeping an item altogether."""
        with self._lock:
            self._items.pop(sku)
            self._quantities.pop(sku, None)

    def find(self, text):
        """Items whose SKU, name or tags match `text`, by SKU."""
        return sorted((item for item in self._items.values() if item.matches(text)), key=lambda item: item.sku)

    def low_stock(self, below=10):
        """(item, quantity) for everything with fewer than `below` units, fewest first."""
        rows = [(self._items[sku], count) for sku, count in self._quantities.items() if count < below]
        return sorted(rows, key=lambda row: (row[1], row[0].sku))

    def value(self):
        """What everything on the shelves is worth at unit prices."""
        return sum(self._items[sku].unit_price * count for sku, count in self._quantities.items())

    def set_supplier(self, sku, name, lead_days, pack=1):
        """Who supplies an item, how many days a delivery takes, and how many units come in a pack."""
        if sku not in self._items:
            raise KeyError(sku)
        if lead_days < 0 or pack < 1:
            raise ValueError("lead time and pack size must be positive")
        self._suppliers[sku] = (name, lead_days, pack)

    def daily_sales(self, sku, days=30):
        """Average units sold per day over the last `days` days."""
        since = self._clock() - days * 86400
        sold = -sum(m.change for m in self.history(sku, since) if m.change < 0 and m.reason == "sale")
        return sold / float(days)

    def reorder_suggestions(self, days=30, cover=14):
        """(sku, supplier, packs to order) for every supplied item whose free units will not last
        its lead time plus `cover` days at the recent rate of sales, most urgent first."""
        rows = []
        for sku, (supplier, lead_days, pack) in sorted(self._suppliers.items()):
            rate = self.daily_sales(sku, days)
            if rate <= 0:
                continue
            needed = rate * (lead_days + cover) - self.available(sku)
            if needed > 0:
                packs = int(-(-needed // pack))
                rows.append((self.available(sku) / rate, sku, supplier, packs))
        return [(sku, supplier, packs) for _days_left, sku, supplier, packs in sorted(rows)]

    def to_rows(self):
        """Every kept item as a row for a CSV file: sku, name, price, category, quantity, reserved."""
        return [(item.sku, item.name, "%.2f" % item.unit_price, item.category,
                 self._quantities.get(item.sku, 0), self.reserved(item.sku))
                for item in sorted(self._items.values(), key=lambda item: item.sku)]

    def summary(self):
        """One line per category: items kept, units on the shelves, units reserved, value."""
        lines = []
        categories = sorted({item.category for item in self._items.values()})
        for category in categories:
            skus = [sku for sku, item in self._items.items() if item.category == category]
            units = sum(self._quantities.get(sku, 0) for sku in skus)
            held = sum(self.reserved(sku) for sku in skus)
            worth = sum(self._items[sku].unit_price * self._quantities.get(sku, 0) for sku in skus)
            lines.append("%-10s %3d items %6d units %5d reserved %10.2f" % (category, len(skus), units, held, worth))
        return "\n".join(lines)
