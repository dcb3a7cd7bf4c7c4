"""A small stock-keeping library."""

from .models import Item
from .pricing import BULK_RULES, bulk_discount, price_for
from .store import OutOfStock, Store

__all__ = ["Item", "Store", "OutOfStock", "BULK_RULES", "bulk_discount", "price_for"]
__version__ = "0.3.1"
