import unittest

from inventory import Item


class ItemTest(unittest.TestCase):
    def test_label(self):
        self.assertEqual(Item("b1", "Bolt", 0.1).label, "Bolt (b1)")

    def test_rejects_bad_values(self):
        with self.assertRaises(ValueError):
            Item(" ", "Nothing", 1.0)
        with self.assertRaises(ValueError):
            Item("n1", "Nut", -0.5)

    def test_matches_tags(self):
        item = Item("w1", "Washer", 0.02, tags=("zinc", "M6"))
        self.assertTrue(item.matches("m6"))
        self.assertFalse(item.matches("brass"))

    def test_with_price(self):
        self.assertEqual(Item("a", "A", 1.0).with_price(2.0).unit_price, 2.0)
