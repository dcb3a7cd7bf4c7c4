"""A store: items and how many of each are on the shelves."""

import threading

from .models import Item


class OutOfStock(Exception):
    """Raised when an order asks for more units than the store has."""

    def __init__(self, sku, wanted, available):
        super().__init__("%s: %d wanted, %d available" % (sku, wanted, available))
        self.sku, self.wanted, self.available = sku, wanted, available


class Store:
    """Items by SKU with their quantities. Safe to use from several threads."""

    def __init__(self):
        self._items = {}
        self._quantities = {}
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
        return self._items[sku]

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
