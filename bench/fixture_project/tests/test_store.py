import unittest

from inventory import Item, OutOfStock, Store


def sample():
    store = Store()
    store.add(Item("bolt", "Hex bolt M6", 0.12, "fasteners", ("m6",)), 500)
    store.add(Item("nut", "Hex nut M6", 0.05, "fasteners", ("m6",)), 8)
    store.add(Item("saw", "Hand saw", 14.5, "tools"), 3)
    return store


class StoreTest(unittest.TestCase):
    def test_take_and_out_of_stock(self):
        store = sample()
        store.take("bolt", 100)
        self.assertEqual(store.quantity("bolt"), 400)
        with self.assertRaises(OutOfStock):
            store.take("saw", 4)

    def test_find_and_low_stock(self):
        store = sample()
        self.assertEqual([item.sku for item in store.find("m6")], ["bolt", "nut"])
        self.assertEqual([(item.sku, count) for item, count in store.low_stock()], [("saw", 3), ("nut", 8)])

    def test_value(self):
        self.assertAlmostEqual(sample().value(), 500 * 0.12 + 8 * 0.05 + 3 * 14.5)
