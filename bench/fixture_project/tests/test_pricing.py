import unittest

from inventory import Item, bulk_discount, price_for
from inventory.pricing import savings


class BulkDiscountTest(unittest.TestCase):
    def test_no_discount_below_the_first_threshold(self):
        self.assertEqual(bulk_discount("general", 9), 0.0)

    def test_discount_applies_from_the_threshold(self):
        self.assertEqual(bulk_discount("general", 10), 0.05)
        self.assertEqual(bulk_discount("fasteners", 500), 0.12)
        self.assertEqual(bulk_discount("tools", 20), 0.08)

    def test_best_rule_wins(self):
        self.assertEqual(bulk_discount("general", 5000), 0.15)

    def test_unknown_category_uses_general(self):
        self.assertEqual(bulk_discount("garden", 100), 0.10)


class PriceTest(unittest.TestCase):
    def test_price_rounds_to_cents(self):
        self.assertEqual(price_for(Item("b", "Bolt", 0.125, "fasteners"), 3), 0.38)

    def test_price_with_discount(self):
        self.assertEqual(price_for(Item("b", "Bolt", 0.10, "fasteners"), 50), 4.75)

    def test_savings(self):
        self.assertEqual(savings(Item("s", "Saw", 10.0, "tools"), 5), 1.5)
